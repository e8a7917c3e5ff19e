//! The engine's KV memory: the pool's bookkeeping (`kv`) joined with the backend's block
//! storage, built from the typed config (tenants → `TenantId`s by their order in the config).

use crate::backend::Backend;
use crate::config::{ConfigError, KvSection, TenantConfig};
use crate::kv::{KvPool, KvPoolConfig, TenantQuota};
use crate::model::llama::Llama;
use crate::types::TenantId;

/// Everything the engine needs to place KV: who may hold which blocks, and the blocks.
pub struct PagedKv<B: Backend> {
    pub pool: KvPool,
    pub store: B::KvStore,
    tenant_names: Vec<String>,
    weights: Vec<(TenantId, f64)>,
}

impl<B: Backend> PagedKv<B> {
    /// Sizes the pool from `kv.cache_bytes` (or the machine) and registers `tenants`.
    pub fn new(
        model: &Llama<B>,
        kv: &KvSection,
        tenants: &[TenantConfig],
    ) -> Result<Self, ConfigError> {
        let bytes = kv.resolved_cache_bytes() as usize;
        let num_blocks = model.kv_blocks_for_bytes(bytes, kv.block_size);
        Self::with_blocks(model, kv, tenants, num_blocks)
    }

    /// A pool of exactly `num_blocks` blocks (tests, single-request tools).
    pub fn with_blocks(
        model: &Llama<B>,
        kv: &KvSection,
        tenants: &[TenantConfig],
        num_blocks: usize,
    ) -> Result<Self, ConfigError> {
        let invalid = |e: crate::kv::KvError| ConfigError::Invalid(e.to_string());
        if num_blocks == 0 {
            return Err(ConfigError::Invalid(format!(
                "kv.cache_bytes holds no block of {} bytes",
                model.kv_bytes_per_block(kv.block_size)
            )));
        }
        let mut cfg = KvPoolConfig::new(num_blocks, kv.secret_bytes()?);
        cfg.block_size = kv.block_size;
        let mut pool = KvPool::new(cfg).map_err(invalid)?;
        for (i, t) in tenants.iter().enumerate() {
            let max_blocks = if t.max_blocks == 0 {
                num_blocks
            } else {
                t.max_blocks.min(num_blocks)
            };
            let quota = TenantQuota {
                reserved_blocks: t.reserved_blocks,
                max_blocks,
                cached_floor: t.cached_floor,
                share_group: t.share_group.clone(),
            };
            pool.register_tenant(TenantId(i as u32), quota)
                .map_err(|e| ConfigError::Invalid(format!("tenant `{}`: {e}", t.name)))?;
        }
        let store = model.new_kv_store(num_blocks, kv.block_size);
        Ok(Self {
            pool,
            store,
            tenant_names: tenants.iter().map(|t| t.name.clone()).collect(),
            weights: tenants
                .iter()
                .enumerate()
                .map(|(i, t)| (TenantId(i as u32), t.weight))
                .collect(),
        })
    }

    /// The id of the tenant called `name` in the config.
    pub fn tenant(&self, name: &str) -> Option<TenantId> {
        self.tenant_names
            .iter()
            .position(|n| n == name)
            .map(|i| TenantId(i as u32))
    }

    /// Each tenant's fair-share weight, for the scheduler.
    pub fn weights(&self) -> Vec<(TenantId, f64)> {
        self.weights.clone()
    }

    /// Performs the copy-on-write copies the pool queued; call before every forward.
    pub fn apply_copies(&mut self, backend: &B) {
        let copies = self.pool.take_copies();
        if !copies.is_empty() {
            backend.copy_blocks(&mut self.store, &copies);
        }
    }
}
