//! Per-tenant admission limits: requests per minute and tokens per minute (token buckets that
//! refill continuously, so a burst of up to a minute's allowance passes and then the rate
//! holds), and concurrent requests (a counter held by a guard for the life of the response,
//! stream included). A refusal says when to retry and carries OpenAI's `x-ratelimit-*` headers.
//! Limits are per tenant, so one tenant's burst never refuses another's request.

use super::error::ApiError;
use crate::tenancy::Tenancy;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A continuous token bucket holding at most `capacity`, refilled at `capacity` per minute.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u64, now: Instant) -> Self {
        Self {
            capacity: per_minute as f64,
            level: per_minute as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.capacity / 60.0).min(self.capacity);
        self.at = now;
    }

    /// Seconds until `cost` is available (0 when it is).
    fn wait_for(&self, cost: f64) -> f64 {
        if cost <= self.level {
            0.0
        } else {
            (cost.min(self.capacity) - self.level) * 60.0 / self.capacity
        }
    }
}

#[derive(Debug)]
struct TenantLimits {
    /// `None`: unlimited.
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    max_concurrent: u32,
}

/// The limiter for every tenant, indexed by `TenantId`.
#[derive(Debug)]
pub struct Limiter {
    tenants: Vec<Mutex<TenantLimits>>,
    active: Vec<Arc<AtomicU32>>,
}

/// Holds one of the tenant's concurrent-request slots; dropping it frees the slot.
#[derive(Debug)]
pub struct ConcurrencyGuard(Arc<AtomicU32>);

impl Drop for ConcurrencyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limiter {
    pub fn new(tenancy: &Tenancy) -> Self {
        let now = Instant::now();
        let mut tenants = Vec::new();
        let mut active = Vec::new();
        for i in 0..tenancy.len() {
            let t = tenancy
                .get(crate::types::TenantId(i as u32))
                .expect("tenant in range");
            tenants.push(Mutex::new(TenantLimits {
                requests: (t.requests_per_minute > 0)
                    .then(|| Bucket::new(t.requests_per_minute.into(), now)),
                tokens: (t.tokens_per_minute > 0).then(|| Bucket::new(t.tokens_per_minute, now)),
                max_concurrent: t.max_concurrent,
            }));
            active.push(Arc::new(AtomicU32::new(0)));
        }
        Self { tenants, active }
    }

    /// Admits one request that may use up to `tokens` tokens (prompt + max completion), or says
    /// why not and when to retry. Nothing is charged when the request is refused.
    pub fn admit(
        &self,
        tenant: crate::types::TenantId,
        tokens: u64,
        now: Instant,
    ) -> Result<ConcurrencyGuard, ApiError> {
        let i = tenant.0 as usize;
        let (Some(lim), Some(active)) = (self.tenants.get(i), self.active.get(i)) else {
            return Err(ApiError::Internal);
        };
        let mut lim = lim.lock().expect("limiter lock");
        let cost = tokens as f64;
        let mut headers = Vec::new();
        let mut refusal: Option<(&'static str, f64)> = None;
        if let Some(b) = lim.requests.as_mut() {
            b.refill(now);
            let wait = b.wait_for(1.0);
            headers.extend(bucket_headers("requests", b, 1.0));
            if wait > 0.0 {
                refusal = Some(("requests", wait));
            }
        }
        if let Some(b) = lim.tokens.as_mut() {
            b.refill(now);
            headers.extend(bucket_headers("tokens", b, cost));
            if cost > b.capacity {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!(
                        "the request may use {tokens} tokens, more than this key's limit of {} per minute",
                        b.capacity
                    ),
                ));
            }
            let wait = b.wait_for(cost);
            if wait > 0.0 && refusal.is_none_or(|(_, w)| wait > w) {
                refusal = Some(("tokens", wait));
            }
        }
        if let Some((kind, wait)) = refusal {
            return Err(ApiError::RateLimited {
                message: format!("rate limit reached for {kind} per minute; retry in {wait:.1} s"),
                kind,
                retry_after_secs: wait.ceil().max(1.0) as u64,
                headers,
            });
        }
        if lim.max_concurrent > 0 {
            let n = active.fetch_add(1, Ordering::AcqRel);
            if n >= lim.max_concurrent {
                active.fetch_sub(1, Ordering::AcqRel);
                return Err(ApiError::RateLimited {
                    message: format!(
                        "too many concurrent requests for this key (limit {})",
                        lim.max_concurrent
                    ),
                    kind: "requests",
                    retry_after_secs: 1,
                    headers,
                });
            }
        } else {
            active.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(b) = lim.requests.as_mut() {
            b.level -= 1.0;
        }
        if let Some(b) = lim.tokens.as_mut() {
            b.level -= cost;
        }
        Ok(ConcurrencyGuard(active.clone()))
    }

    /// Requests in flight for `tenant`.
    pub fn active(&self, tenant: crate::types::TenantId) -> u32 {
        self.active
            .get(tenant.0 as usize)
            .map_or(0, |a| a.load(Ordering::Acquire))
    }
}

fn bucket_headers(kind: &str, b: &Bucket, cost: f64) -> Vec<(&'static str, String)> {
    let (limit, remaining, reset) = match kind {
        "requests" => (
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ),
        _ => (
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ),
    };
    vec![
        (limit, format!("{}", b.capacity as u64)),
        (remaining, format!("{}", b.level.max(0.0).floor() as u64)),
        (reset, format!("{:.1}s", b.wait_for(cost))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::TenantId;
    use std::path::Path;
    use std::time::Duration;

    fn tenancy() -> Tenancy {
        let toml = r#"
[[tenant]]
id = "a"
api_keys_sha256 = ["0000000000000000000000000000000000000000000000000000000000000001"]
requests_per_minute = 3
tokens_per_minute = 1000
max_concurrent = 2
[[tenant]]
id = "b"
api_keys_sha256 = ["0000000000000000000000000000000000000000000000000000000000000002"]
"#;
        Tenancy::from_toml(toml, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn request_rate_refuses_with_retry_after_and_refills() {
        let l = Limiter::new(&tenancy());
        let t0 = Instant::now();
        let a = TenantId(0);
        for _ in 0..3 {
            drop(l.admit(a, 10, t0).unwrap());
        }
        let e = l.admit(a, 10, t0).unwrap_err();
        let ApiError::RateLimited {
            kind,
            retry_after_secs,
            headers,
            ..
        } = &e
        else {
            panic!("{e:?}");
        };
        assert_eq!((*kind, *retry_after_secs), ("requests", 20));
        assert!(headers.contains(&("x-ratelimit-limit-requests", "3".into())));
        assert!(headers.contains(&("x-ratelimit-remaining-requests", "0".into())));
        // The other tenant is unlimited and unaffected.
        assert!(l.admit(TenantId(1), 1_000_000, t0).is_ok());
        // One request comes back every 20 s.
        assert!(l.admit(a, 10, t0 + Duration::from_secs(21)).is_ok());
        assert!(l.admit(a, 10, t0 + Duration::from_secs(22)).is_err());
    }

    #[test]
    fn token_rate_and_concurrency() {
        let l = Limiter::new(&tenancy());
        let t0 = Instant::now();
        let a = TenantId(0);
        let g1 = l.admit(a, 600, t0).unwrap();
        let e = l.admit(a, 600, t0).unwrap_err();
        assert!(
            matches!(e, ApiError::RateLimited { kind: "tokens", .. }),
            "{e:?}"
        );
        assert!(matches!(
            l.admit(a, 5000, t0),
            Err(ApiError::Invalid { .. })
        ));
        let g2 = l.admit(a, 100, t0).unwrap();
        assert_eq!(l.active(a), 2);
        let e = l.admit(a, 1, t0 + Duration::from_secs(60)).unwrap_err();
        assert!(e.to_string().contains("concurrent"), "{e}");
        drop(g1);
        assert_eq!(l.active(a), 1);
        drop(g2);
        assert!(l.admit(a, 1, t0 + Duration::from_secs(60)).is_ok());
        assert_eq!(l.active(a), 0, "the guard was dropped at once");
    }
}
