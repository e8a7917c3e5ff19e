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
    /// The KV policies served and what they cost.
    pub kv: super::kv::KvCatalog,
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
        kv: super::kv::KvCatalog,
    ) -> Self {
        Self {
            kv,
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

    /// The KV policy a request of `tenant` runs under (its `kv_policy` or the tenant's
    /// default), checked against what the tenant may use and the backend serves.
    pub fn kv_choice(
        &self,
        tenant: crate::types::TenantId,
        requested: Option<&str>,
    ) -> Result<crate::engine::KvChoice, super::error::ApiError> {
        let default = crate::tenancy::TenantKv::default();
        let t = self.tenancy.kv(tenant).unwrap_or(&default);
        self.kv.choose(requested, t)
    }

    /// Counts `e` as a rejection of `tenant`'s request if it is one (see
    /// [`super::error::ApiError::rejection_reason`]).
    pub fn count_rejection(
        &self,
        tenant: Option<crate::types::TenantId>,
        e: &super::error::ApiError,
    ) {
        if let Some(r) = e.rejection_reason() {
            self.metrics.reject(tenant, r);
        }
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_draining() && self.engine.failure().is_none()
    }
}
