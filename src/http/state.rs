//! What every handler shares: the model's text side, the engine handle, tenants and their
//! limits, the server's bounds, and whether the server is draining.

use super::limits::Limiter;
use crate::config::ServerSection;
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::model::chat_template::ChatTemplate;
use crate::model::tokenizer::Tokenizer;
use crate::tenancy::Tenancy;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The served model as the HTTP layer sees it: text in, token ids out.
pub struct ModelInfo {
    /// The id clients send in `model`.
    pub name: String,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub vocab_size: usize,
    pub max_context: usize,
    pub eos_token_ids: Vec<u32>,
    /// Seconds since the epoch when the server started (the model card's `created`).
    pub created: u64,
}

pub struct AppState {
    pub model: ModelInfo,
    pub engine: EngineHandle,
    pub tenancy: Tenancy,
    pub limiter: Limiter,
    pub limits: ServerSection,
    pub metrics: Arc<Metrics>,
    /// Set by SIGTERM: `/ready` turns 503 and new generations are refused.
    draining: AtomicBool,
    /// Set once the model is loaded and the engine runs.
    ready: AtomicBool,
}

impl AppState {
    pub fn new(
        model: ModelInfo,
        engine: EngineHandle,
        tenancy: Tenancy,
        limits: ServerSection,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            model,
            engine,
            limiter: Limiter::new(&tenancy),
            tenancy,
            limits,
            metrics,
            draining: AtomicBool::new(false),
            ready: AtomicBool::new(true),
        }
    }

    /// The tenant's default KV policy (a request's `kv_policy` overrides it).
    pub fn kv_policy(&self, tenant: crate::types::TenantId) -> &str {
        self.tenancy
            .get(tenant)
            .map_or("bf16", |t| t.kv_policy.as_str())
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_draining()
    }
}
