//! Prometheus metrics, declared once as typed handles in one registry.
//!
//! Who records: only `engine` (token counts, latencies, admissions, and the gauges it mirrors
//! from its stats structs when `/metrics` is scraped) and `http` (responses, rejections). Lower
//! layers (`kv`, the scheduler) only return stats structs. This module knows neither: it is a
//! leaf that holds the handles and renders the text format.
//!
//! Names follow vLLM's families (`vllm:X` ↔ `kvserve_X`, same units, same histogram bucket
//! edges, so existing dashboards translate by prefix). The prefix is `kvserve_`, not
//! `kvserve:`, because colons are reserved for recording rules and `promtool check metrics`
//! rejects them.
//!
//! Besides its own families the registry carries the standard `process_*` ones (Linux).
//!
//! The `tenant` label is bounded: its values are the tenant names from configuration, plus
//! `other` for anything else (e.g. a request whose API key was not recognised). Per-policy
//! labels carry the storage format only (`bf16`, `int8`, `kivi4`, `mhc+int8`, …), never window
//! or quest sizes or the `mhc` rank, which a client may vary freely.

use crate::types::TenantId;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::Mutex;

/// The label value for tenants outside the configuration.
pub const OTHER_TENANT: &str = "other";

/// vLLM's time-to-first-token buckets (seconds).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token latency buckets (seconds).
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request latency buckets (seconds): end-to-end latency and queue time.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Why a request was refused (the `reason` label of `kvserve_request_rejections_total`).
pub mod reason {
    pub const AUTH: &str = "auth";
    pub const RATE_LIMIT: &str = "rate_limit";
    pub const OVERLOADED: &str = "overloaded";
    pub const CONTEXT_LENGTH: &str = "context_length";
    pub const QUEUE_TIMEOUT: &str = "queue_timeout";
    pub const KV_QUOTA: &str = "kv_quota";
    pub const DRAINING: &str = "draining";
    /// The engine failed for good (see `EngineError::Failed`): refused until the restart.
    pub const ENGINE_FAILED: &str = "engine_failed";
    pub const ALL: &[&str] = &[
        AUTH,
        RATE_LIMIT,
        OVERLOADED,
        CONTEXT_LENGTH,
        QUEUE_TIMEOUT,
        KV_QUOTA,
        DRAINING,
        ENGINE_FAILED,
    ];
}

pub struct Metrics {
    registry: Registry,
    /// Tenant names by `TenantId` (the label values).
    tenants: Vec<String>,
    scrape: Mutex<()>,

    // --- recorded by http ---
    /// HTTP responses by endpoint and status code.
    pub http_requests: IntCounterVec,
    /// Refused requests by tenant and reason (see [`reason`]).
    pub rejections: IntCounterVec,

    // --- recorded by the engine as things happen ---
    /// Prompt tokens of admitted requests (counted once, at the first admission), by tenant.
    pub prompt_tokens: IntCounterVec,
    /// Tokens sampled, by tenant.
    pub generation_tokens: IntCounterVec,
    /// Finished requests by tenant and `finished_reason` (`stop`, `length`, `abort`).
    pub request_success: IntCounterVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: HistogramVec,
    pub e2e_latency: HistogramVec,
    pub queue_time: HistogramVec,
    /// Bytes a finished request's KV took less than it would under `bf16`, by tenant and format.
    pub kv_bytes_saved: IntCounterVec,
    /// Requests admitted under a fallback KV policy, by tenant and the fallback's format.
    pub kv_fallback_admissions: IntCounterVec,

    // --- mirrored by the engine from its stats when scraped ---
    pub running: IntGaugeVec,
    pub waiting: IntGaugeVec,
    pub kv_usage: Gauge,
    pub kv_tenant_usage: GaugeVec,
    pub kv_bytes: IntGaugeVec,
    pub kv_tenant_bytes: IntGaugeVec,
    pub kv_blocks: IntGaugeVec,
    pub prefix_queries: IntCounterVec,
    pub prefix_hits: IntCounterVec,
    pub computed_tokens: IntCounter,
    pub preemptions: IntCounter,
    pub evictions: IntCounter,
    /// 1 while the engine serves, 0 once it failed for good (`EngineError::Failed`).
    pub engine_healthy: IntGauge,
}

fn name(n: &str) -> String {
    format!("kvserve_{n}")
}

impl Metrics {
    /// Handles for a server whose tenants are `tenants` (in `TenantId` order).
    pub fn new(tenants: Vec<String>) -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("unique metric name");
        };
        let counter = |n: &str, help: &str| {
            let c = IntCounter::with_opts(Opts::new(name(n), help)).expect("valid metric");
            reg(Box::new(c.clone()));
            c
        };
        let counter_vec = |n: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name(n), help), labels).expect("valid metric");
            reg(Box::new(c.clone()));
            c
        };
        let gauge_vec = |n: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name(n), help), labels).expect("valid metric");
            reg(Box::new(g.clone()));
            g
        };
        let histogram = |n: &str, help: &str, buckets: &[f64]| {
            let opts = HistogramOpts::new(name(n), help).buckets(buckets.to_vec());
            let h = HistogramVec::new(opts, &["tenant"]).expect("valid metric");
            reg(Box::new(h.clone()));
            h
        };
        let kv_usage = Gauge::with_opts(Opts::new(
            name("kv_cache_usage_perc"),
            "Fraction of the KV pool's bytes held by blocks in use (0 to 1; cached-free blocks \
             count as free, as in vLLM).",
        ))
        .expect("valid metric");
        reg(Box::new(kv_usage.clone()));
        let kv_tenant_usage = GaugeVec::new(
            Opts::new(
                name("kv_cache_tenant_usage_perc"),
                "Fraction of the KV pool's bytes in use by each tenant (0 to 1).",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        reg(Box::new(kv_tenant_usage.clone()));
        let engine_healthy = IntGauge::with_opts(Opts::new(
            name("engine_healthy"),
            "1 while the engine serves; 0 once it failed for good (its device was lost or its \
             loop panicked): requests get 503 engine_failed and the server exits.",
        ))
        .expect("valid metric");
        engine_healthy.set(1);
        reg(Box::new(engine_healthy.clone()));

        let m = Self {
            http_requests: counter_vec(
                "http_requests_total",
                "HTTP responses by endpoint and status code.",
                &["endpoint", "status"],
            ),
            rejections: counter_vec(
                "request_rejections_total",
                "Requests refused, by tenant and reason (auth, rate_limit, overloaded, \
                 context_length, queue_timeout, kv_quota, draining, engine_failed).",
                &["tenant", "reason"],
            ),
            prompt_tokens: counter_vec(
                "prompt_tokens_total",
                "Prompt tokens of admitted requests (cached ones included), by tenant.",
                &["tenant"],
            ),
            generation_tokens: counter_vec(
                "generation_tokens_total",
                "Tokens generated, by tenant.",
                &["tenant"],
            ),
            request_success: counter_vec(
                "request_success_total",
                "Finished requests, by tenant and finish reason.",
                &["tenant", "finished_reason"],
            ),
            time_to_first_token: histogram(
                "time_to_first_token_seconds",
                "Seconds from submission to the engine until the first token, by tenant.",
                TTFT_BUCKETS,
            ),
            inter_token_latency: histogram(
                "inter_token_latency_seconds",
                "Seconds between consecutive tokens of a request, by tenant.",
                ITL_BUCKETS,
            ),
            e2e_latency: histogram(
                "e2e_request_latency_seconds",
                "Seconds from submission to the engine until the request finished, by tenant.",
                REQUEST_BUCKETS,
            ),
            queue_time: histogram(
                "request_queue_time_seconds",
                "Seconds a request waited before its first admission, by tenant.",
                REQUEST_BUCKETS,
            ),
            kv_bytes_saved: counter_vec(
                "kv_compression_bytes_saved_total",
                "KV bytes finished requests held less than under bf16, by tenant and KV format.",
                &["tenant", "policy"],
            ),
            kv_fallback_admissions: counter_vec(
                "kv_fallback_admissions_total",
                "Requests admitted under a fallback KV policy, by tenant and the fallback's \
                 format.",
                &["tenant", "policy"],
            ),
            running: gauge_vec(
                "num_requests_running",
                "Sequences in the running batch, by tenant.",
                &["tenant"],
            ),
            waiting: gauge_vec(
                "num_requests_waiting",
                "Requests waiting for admission (queued or preempted), by tenant.",
                &["tenant"],
            ),
            kv_usage,
            kv_tenant_usage,
            kv_bytes: gauge_vec(
                "kv_cache_bytes",
                "KV pool bytes by state (used, cached, free); blocks of every policy share the \
                 pool, each weighing its own bytes.",
                &["state"],
            ),
            kv_tenant_bytes: gauge_vec(
                "kv_cache_tenant_bytes",
                "KV bytes per tenant by state (used, cached).",
                &["tenant", "state"],
            ),
            kv_blocks: gauge_vec(
                "kv_cache_blocks",
                "KV blocks by state: used and cached count blocks; free is how many exact \
                 (filling) blocks the free bytes hold.",
                &["state"],
            ),
            prefix_queries: counter_vec(
                "prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache, by tenant.",
                &["tenant"],
            ),
            prefix_hits: counter_vec(
                "prefix_cache_hits_total",
                "Prompt tokens served from the prefix cache, by tenant.",
                &["tenant"],
            ),
            computed_tokens: counter(
                "computed_tokens_total",
                "Tokens computed by forward passes (prompt chunks and decode rows).",
            ),
            preemptions: counter(
                "num_preemptions_total",
                "Sequences preempted (their KV freed, to be recomputed).",
            ),
            evictions: counter(
                "kv_cache_evictions_total",
                "Cached-free KV blocks evicted to make room.",
            ),
            engine_healthy,
            tenants,
            registry,
            scrape: Mutex::new(()),
        };
        // The standard `process_*` families (resident memory, CPU seconds, open files,
        // threads, start time) that every Prometheus exporter has: the resident memory is
        // how an operator sees that the server holds what its KV pool charges.
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric name");
        m.touch();
        m
    }

    /// Creates every per-tenant series at zero, so that rates and dashboards see a tenant
    /// before its first request, and a scrape of an idle server already lists every family.
    fn touch(&self) {
        for t in self.tenant_labels() {
            for v in [
                &self.prompt_tokens,
                &self.generation_tokens,
                &self.prefix_queries,
                &self.prefix_hits,
            ] {
                v.with_label_values(&[t]);
            }
            for h in [
                &self.time_to_first_token,
                &self.inter_token_latency,
                &self.e2e_latency,
                &self.queue_time,
            ] {
                h.with_label_values(&[t]);
            }
            for r in reason::ALL {
                self.rejections.with_label_values(&[t, r]);
            }
            for r in ["stop", "length", "abort"] {
                self.request_success.with_label_values(&[t, r]);
            }
            self.running.with_label_values(&[t]);
            self.waiting.with_label_values(&[t]);
            self.kv_tenant_usage.with_label_values(&[t]);
            for s in ["used", "cached"] {
                self.kv_tenant_bytes.with_label_values(&[t, s]);
            }
        }
        for s in ["used", "cached", "free"] {
            self.kv_bytes.with_label_values(&[s]);
            self.kv_blocks.with_label_values(&[s]);
        }
    }

    /// The configured tenant names, then `other`.
    pub fn tenant_labels(&self) -> impl Iterator<Item = &str> {
        self.tenants
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(OTHER_TENANT))
    }

    /// The `tenant` label value of `id` (`other` for ids outside the configuration).
    pub fn tenant(&self, id: TenantId) -> &str {
        self.tenants
            .get(id.0 as usize)
            .map_or(OTHER_TENANT, String::as_str)
    }

    /// Counts a refused request (`tenant` unknown when authentication failed).
    pub fn reject(&self, tenant: Option<TenantId>, reason: &str) {
        let t = tenant.map_or(OTHER_TENANT, |id| self.tenant(id));
        self.rejections.with_label_values(&[t, reason]).inc();
    }

    /// The Prometheus text exposition. `refresh` runs first (under a lock, one scrape at a
    /// time) to mirror the engine's stats into the gauges.
    pub fn render(&self, refresh: impl FnOnce(&Self)) -> String {
        let _one_at_a_time = self.scrape.lock().expect("scrape lock");
        refresh(self);
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

/// Raises a counter that mirrors a cumulative total kept elsewhere (only the scrape, under its
/// lock, writes such counters, so they never run ahead of `total`).
pub fn mirror(counter: &IntCounter, total: u64) {
    let cur = counter.get();
    if total > cur {
        counter.inc_by(total - cur);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_labels_are_bounded_and_every_family_renders() {
        let m = Metrics::new(vec!["alpha".into(), "beta".into()]);
        assert_eq!(m.tenant(TenantId(1)), "beta");
        assert_eq!(m.tenant(TenantId(7)), OTHER_TENANT);
        m.reject(None, reason::AUTH);
        m.reject(Some(TenantId(0)), reason::RATE_LIMIT);
        let text = m.render(|m| mirror(&m.preemptions, 3));
        assert!(
            text.contains("kvserve_request_rejections_total{reason=\"auth\",tenant=\"other\"} 1")
        );
        assert!(text.contains(
            "kvserve_request_rejections_total{reason=\"rate_limit\",tenant=\"alpha\"} 1"
        ));
        assert!(text.contains("kvserve_num_preemptions_total 3"));
        assert!(text.contains(
            "kvserve_time_to_first_token_seconds_bucket{tenant=\"beta\",le=\"0.001\"} 0"
        ));
        // Mirroring never goes backwards.
        let text = m.render(|m| mirror(&m.preemptions, 2));
        assert!(text.contains("kvserve_num_preemptions_total 3"));
        assert!(!text.contains("kvserve:"));
    }
}
