//! What the engine records in [`Metrics`]: per-request latencies and token counts as events
//! leave the loop ([`Recorder`], on the loop thread), and the gauges and cumulative counters
//! mirrored from [`EngineStats`] when `/metrics` is scraped ([`EngineStats::record`]). The
//! scheduler and the KV pool only return stats structs; this is where they become metrics.

use super::handle::EngineStats;
use super::request::EngineEvent;
use super::scheduler::Admission;
use crate::metrics::{mirror, Metrics};
use crate::types::{FinishReason, RequestId, TenantId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// One live request's clock.
struct Timing {
    tenant: TenantId,
    /// When the handle accepted it (vLLM's arrival time: latencies start here).
    arrived: Instant,
    prompt_tokens: usize,
    last_token: Option<Instant>,
}

/// Turns the loop's events into metrics. Every request it is told about ends with exactly one
/// terminal event (`Finished` or `Error`), which forgets it.
pub(super) struct Recorder {
    metrics: Arc<Metrics>,
    live: HashMap<RequestId, Timing>,
}

impl Recorder {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        // Every (tenant, format) series of the per-policy counters starts at zero, so that the
        // families are exported (and dashboards' rates defined) before the first compressed
        // request or fallback. Bounded: tenants × formats.
        for f in FORMATS {
            for t in metrics.tenant_labels() {
                metrics.kv_bytes_saved.with_label_values(&[t, f]);
                metrics.kv_fallback_admissions.with_label_values(&[t, f]);
            }
        }
        Self {
            metrics,
            live: HashMap::new(),
        }
    }

    /// A request the scheduler accepted.
    pub fn submitted(
        &mut self,
        id: RequestId,
        tenant: TenantId,
        prompt_tokens: usize,
        at: Instant,
    ) {
        self.live.insert(
            id,
            Timing {
                tenant,
                arrived: at,
                prompt_tokens,
                last_token: None,
            },
        );
    }

    /// A request's first admission: its queue time, its prompt tokens, any fallback policy.
    pub fn admitted(&self, a: &Admission, now: Instant) {
        let Some(t) = self.live.get(&a.id) else {
            return;
        };
        let m = &self.metrics;
        let tenant = m.tenant(t.tenant);
        let queued = now.saturating_duration_since(t.arrived);
        m.queue_time
            .with_label_values(&[tenant])
            .observe(queued.as_secs_f64());
        m.prompt_tokens
            .with_label_values(&[tenant])
            .inc_by(t.prompt_tokens as u64);
        if let Some(p) = a.fallback {
            m.kv_fallback_admissions
                .with_label_values(&[tenant, format_name(&p)])
                .inc();
        }
        tracing::debug!(
            request = a.id.0,
            tenant,
            prompt_tokens = t.prompt_tokens,
            queued_ms = queued.as_millis() as u64,
            fallback = a.fallback.map(|p| p.to_string()),
            "admitted"
        );
    }

    /// An event on its way to the request's caller.
    pub fn event(&mut self, id: RequestId, event: &EngineEvent, now: Instant) {
        let m = &self.metrics;
        match event {
            EngineEvent::Token(_) => {
                let Some(t) = self.live.get_mut(&id) else {
                    return;
                };
                let tenant = m.tenant(t.tenant);
                m.generation_tokens.with_label_values(&[tenant]).inc();
                match t.last_token {
                    None => m
                        .time_to_first_token
                        .with_label_values(&[tenant])
                        .observe(now.saturating_duration_since(t.arrived).as_secs_f64()),
                    Some(last) => m
                        .inter_token_latency
                        .with_label_values(&[tenant])
                        .observe(now.saturating_duration_since(last).as_secs_f64()),
                }
                t.last_token = Some(now);
            }
            EngineEvent::Finished {
                reason,
                usage,
                preemptions,
            } => {
                let Some(t) = self.live.remove(&id) else {
                    return;
                };
                let tenant = m.tenant(t.tenant);
                let e2e = now.saturating_duration_since(t.arrived);
                m.e2e_latency
                    .with_label_values(&[tenant])
                    .observe(e2e.as_secs_f64());
                let reason = match reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                    FinishReason::Abort => "abort",
                };
                m.request_success.with_label_values(&[tenant, reason]).inc();
                let saved = usage.kv_bytes_bf16.saturating_sub(usage.kv_bytes);
                if saved > 0 {
                    m.kv_bytes_saved
                        .with_label_values(&[tenant, format_name(&usage.kv_policy)])
                        .inc_by(saved as u64);
                }
                tracing::debug!(
                    request = id.0,
                    tenant,
                    reason,
                    prompt_tokens = usage.prompt_tokens,
                    cached_tokens = usage.cached_tokens,
                    completion_tokens = usage.completion_tokens,
                    preemptions,
                    ms = e2e.as_millis() as u64,
                    "finished"
                );
            }
            EngineEvent::Error(e) => {
                if let Some(t) = self.live.remove(&id) {
                    tracing::debug!(request = id.0, tenant = m.tenant(t.tenant), %e, "failed");
                }
            }
            EngineEvent::PromptLogprobs(_) => {}
        }
    }
}

/// Every value of the `policy` label: the storage formats, `mhc` by its value format only.
const FORMATS: [&str; 9] = [
    "exact",
    "bf16",
    "int8",
    "kivi4",
    "kivi2",
    "k8v4",
    "mhc+bf16",
    "mhc+int8",
    "mhc+kivi4",
];

/// A policy's storage format: the bounded part of its name (window and quest sizes and the
/// `mhc` rank are not bounded: a client may vary them).
fn format_name(p: &crate::kv::policy::KvPolicy) -> &'static str {
    use crate::kv::codec::{Codec, MhcValues};
    match p.codec {
        None => "exact",
        Some(Codec::Bf16) => "bf16",
        Some(Codec::Int8) => "int8",
        Some(Codec::Kivi4) => "kivi4",
        Some(Codec::Kivi2) => "kivi2",
        Some(Codec::K8v4) => "k8v4",
        Some(Codec::Mhc { values, .. }) => match values {
            MhcValues::Bf16 => "mhc+bf16",
            MhcValues::Int8 => "mhc+int8",
            MhcValues::Kivi4 => "mhc+kivi4",
        },
    }
}

impl EngineStats {
    /// Mirrors this snapshot into `m`'s gauges and cumulative counters (call under
    /// [`Metrics::render`]'s lock).
    pub fn record(&self, m: &Metrics) {
        let s = &self.scheduler;
        // Every tenant first reads zero: one whose last request left has no entry.
        for t in m.tenant_labels() {
            m.running.with_label_values(&[t]).set(0);
            m.waiting.with_label_values(&[t]).set(0);
        }
        for (id, load) in &s.tenants {
            let t = m.tenant(*id);
            m.running.with_label_values(&[t]).add(load.running as i64);
            m.waiting.with_label_values(&[t]).add(load.waiting as i64);
        }
        mirror(&m.preemptions, s.preemptions);
        mirror(&m.computed_tokens, self.tokens_computed);
        let Some(kv) = &self.kv else {
            return;
        };
        for (state, v) in [("used", kv.used), ("cached", kv.cached), ("free", kv.free)] {
            m.kv_bytes.with_label_values(&[state]).set(v as i64);
        }
        let free_blocks = kv.free / self.block_bytes.max(1);
        for (state, v) in [
            ("used", kv.used_blocks),
            ("cached", kv.cached_blocks),
            ("free", free_blocks),
        ] {
            m.kv_blocks.with_label_values(&[state]).set(v as i64);
        }
        let capacity = kv.capacity.max(1) as f64;
        m.kv_usage.set(kv.used as f64 / capacity);
        mirror(&m.evictions, kv.evictions);
        for (id, t) in &kv.tenants {
            let name = m.tenant(*id);
            m.kv_tenant_bytes
                .with_label_values(&[name, "used"])
                .set(t.used as i64);
            m.kv_tenant_bytes
                .with_label_values(&[name, "cached"])
                .set(t.cached as i64);
            m.kv_tenant_usage
                .with_label_values(&[name])
                .set(t.used as f64 / capacity);
            mirror(
                &m.prefix_queries.with_label_values(&[name]),
                t.prefix_query_tokens,
            );
            mirror(
                &m.prefix_hits.with_label_values(&[name]),
                t.prefix_hit_tokens,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::codec::{Codec, MhcValues};
    use crate::kv::policy::KvPolicy;

    #[test]
    fn every_format_label_is_declared() {
        let codecs = Codec::PLAIN.into_iter().chain(
            MhcValues::ALL
                .into_iter()
                .map(|values| Codec::Mhc { rank: 64, values }),
        );
        for c in std::iter::once(None).chain(codecs.map(Some)) {
            let p = KvPolicy {
                codec: c,
                window: Some(512),
                quest: None,
            };
            assert!(FORMATS.contains(&format_name(&p)), "{p}");
        }
    }
}
