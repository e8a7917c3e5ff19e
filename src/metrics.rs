//! Prometheus metrics, declared once as typed handles in one registry. Lower layers only return
//! stats structs ([`EngineStats`]); the gauges that mirror them are refreshed when `/metrics` is
//! scraped. The `tenant` label is bounded: tenants come from configuration only.

use crate::engine::EngineStats;
use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use std::sync::Mutex;

pub struct Metrics {
    registry: Registry,
    /// HTTP responses by endpoint and status code.
    pub http_requests: IntCounterVec,
    /// Refusals by reason (`rate_limit`, `overloaded`, `auth`, `context_length`, `invalid`).
    pub rejections: IntCounterVec,
    running: IntGauge,
    waiting: IntGauge,
    kv_blocks: IntGaugeVec,
    kv_tenant_blocks: IntGaugeVec,
    prefix_hit_tokens: IntGaugeVec,
    tokens_generated: IntGauge,
    tokens_computed: IntGauge,
    preemptions: IntGauge,
    /// Tenant names by `TenantId` (the label values).
    tenants: Vec<String>,
    scrape: Mutex<()>,
}

fn name(n: &str) -> String {
    format!("kvserve:{n}")
}

impl Metrics {
    pub fn new(tenants: Vec<String>) -> Self {
        let registry = Registry::new();
        let counter_vec = |n: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name(n), help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |n: &str, help: &str| {
            let g = IntGauge::with_opts(Opts::new(name(n), help)).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let gauge_vec = |n: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name(n), help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        Self {
            http_requests: counter_vec(
                "http_requests_total",
                "HTTP responses by endpoint and status code.",
                &["endpoint", "status"],
            ),
            rejections: counter_vec(
                "request_rejections_total",
                "Requests refused, by reason.",
                &["reason"],
            ),
            running: gauge("num_requests_running", "Sequences in the running batch."),
            waiting: gauge("num_requests_waiting", "Requests waiting for admission."),
            kv_blocks: gauge_vec(
                "kv_bytes",
                "KV pool bytes by state (used, cached, free); blocks of every policy share \
                 the pool, each weighing its own bytes.",
                &["state"],
            ),
            kv_tenant_blocks: gauge_vec(
                "kv_tenant_bytes",
                "KV bytes per tenant by state (used, cached).",
                &["tenant", "state"],
            ),
            prefix_hit_tokens: gauge_vec(
                "prefix_cache_hit_tokens",
                "Prompt tokens served from the prefix cache since start, per tenant.",
                &["tenant"],
            ),
            tokens_generated: gauge("generation_tokens", "Tokens sampled since start."),
            tokens_computed: gauge(
                "computed_tokens",
                "Tokens computed by forward passes since start (prompt and decode).",
            ),
            preemptions: gauge("preemptions", "Sequences preempted since start."),
            tenants,
            registry,
            scrape: Mutex::new(()),
        }
    }

    fn tenant(&self, id: crate::types::TenantId) -> &str {
        self.tenants
            .get(id.0 as usize)
            .map_or("other", String::as_str)
    }

    /// The Prometheus text exposition, with the engine gauges refreshed from `stats`.
    pub fn render(&self, stats: &EngineStats) -> String {
        let _one_at_a_time = self.scrape.lock().expect("scrape lock");
        self.running.set(stats.scheduler.running as i64);
        self.waiting.set(stats.scheduler.waiting as i64);
        self.preemptions.set(stats.scheduler.preemptions as i64);
        self.tokens_generated.set(stats.tokens_generated as i64);
        self.tokens_computed.set(stats.tokens_computed as i64);
        if let Some(kv) = &stats.kv {
            self.kv_blocks
                .with_label_values(&["used"])
                .set(kv.used as i64);
            self.kv_blocks
                .with_label_values(&["cached"])
                .set(kv.cached as i64);
            self.kv_blocks
                .with_label_values(&["free"])
                .set(kv.free as i64);
            for (id, t) in &kv.tenants {
                let name = self.tenant(*id);
                self.kv_tenant_blocks
                    .with_label_values(&[name, "used"])
                    .set(t.used as i64);
                self.kv_tenant_blocks
                    .with_label_values(&[name, "cached"])
                    .set(t.cached as i64);
                self.prefix_hit_tokens
                    .with_label_values(&[name])
                    .set(t.prefix_hit_tokens as i64);
            }
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}
