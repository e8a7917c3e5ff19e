//! The engine's KV memory: the pool's bookkeeping (`kv`) joined with the backend's block
//! storage, built from the typed config (tenants → `TenantId`s by their order in the config).

use super::device_budget::{device_budget, DeviceBudget};
use crate::backend::Backend;
use crate::config::{ConfigError, EngineSection, KvSection, TenantConfig};
use crate::kv::codec::Codec;
use crate::kv::policy::KvPolicy;
use crate::kv::{BlockClass, KvPool, KvPoolConfig, TenantQuota};
use crate::model::llama::Llama;
use crate::types::TenantId;

/// Everything the engine needs to place KV: who may hold which blocks, and the blocks.
pub struct PagedKv<B: Backend> {
    pub pool: KvPool,
    pub store: B::KvStore,
    pub classes: KvClasses,
    tenant_names: Vec<String>,
    weights: Vec<(TenantId, f64)>,
}

/// What each KV policy's blocks weigh in the pool and how they are keyed: the bridge from a
/// policy (engine, backend) to `kv`'s [`BlockClass`]. In the engine's pool a unit is a byte:
/// a block weighs the backend's exact bytes while it fills and its policy's sealed bytes after.
#[derive(Debug, Clone)]
pub struct KvClasses {
    block_size: usize,
    /// Bytes of a filling (exact) block; 1 in a uniform pool.
    filling: usize,
    /// Sealed bytes per (codec, key bounds); empty in a uniform pool (every block weighs 1).
    sealed: Vec<((Option<Codec>, bool), usize)>,
    /// The calibration id `mhc:R` blocks are sealed with, per rank (mixed into their keys).
    calibrations: Vec<(u16, [u8; 32])>,
}

impl KvClasses {
    /// Every block one unit (tests and tools whose pool counts blocks).
    pub fn uniform(block_size: usize) -> Self {
        Self {
            block_size,
            filling: 1,
            sealed: Vec::new(),
            calibrations: Vec::new(),
        }
    }

    /// Byte weights of `model`'s blocks on its backend.
    pub fn for_model<B: Backend>(model: &Llama<B>, block_size: usize) -> Self {
        let cfg = model.config();
        let shape = model.attn_shape();
        let be = model.backend();
        let mut sealed = Vec::new();
        for codec in std::iter::once(None).chain(model.codecs().into_iter().map(Some)) {
            for bounds in [false, true] {
                let policy = KvPolicy {
                    codec,
                    window: None,
                    quest: bounds.then_some(1),
                };
                let bytes =
                    be.kv_sealed_bytes_per_block(cfg.num_layers, block_size, shape, &policy);
                sealed.push(((codec, policy.stores_bounds()), bytes));
            }
        }
        Self {
            block_size,
            filling: model.kv_bytes_per_block(block_size),
            sealed,
            calibrations: model.latent_keys().iter().map(|k| (k.rank, k.id)).collect(),
        }
    }

    /// The policy's content id, with the calibration id mixed in for `mhc` (blocks sealed
    /// with different projections never alias).
    fn content_id(&self, policy: &KvPolicy) -> u32 {
        let id = policy.content_id();
        let Some(rank) = policy.codec.and_then(Codec::latent_rank) else {
            return id;
        };
        let calib = self
            .calibrations
            .iter()
            .find(|(r, _)| *r == rank)
            .map_or([0; 32], |(_, c)| *c);
        let mut h = blake3::Hasher::new();
        h.update(&id.to_le_bytes());
        h.update(&calib);
        u32::from_le_bytes(h.finalize().as_bytes()[..4].try_into().expect("4 bytes")) | 1
    }

    fn sealed(&self, policy: &KvPolicy) -> usize {
        let key = (policy.codec, policy.stores_bounds());
        self.sealed
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(self.filling, |(_, b)| *b)
    }

    /// Bytes of a filling (exact) block.
    pub fn filling_bytes(&self) -> usize {
        self.filling
    }

    /// The lightest block any policy has (sizes the pool's id space).
    pub fn lightest(&self) -> usize {
        self.sealed
            .iter()
            .map(|(_, b)| *b)
            .chain([self.filling])
            .min()
            .unwrap_or(1)
            .max(1)
    }

    pub fn class(&self, policy: &KvPolicy) -> BlockClass {
        BlockClass {
            filling: self.filling,
            sealed: self.sealed(policy),
            content_id: self.content_id(policy),
            shares_prefix: policy.shares_prefix(),
            window_blocks: policy.window_blocks(self.block_size),
        }
    }

    /// Units a sequence of `tokens` tokens holds under `policy` when no step is running (its
    /// full blocks sealed, the tail exact, a window's dropped blocks gone).
    pub fn bytes(&self, policy: &KvPolicy, tokens: usize) -> usize {
        self.class(policy).min_units(tokens, self.block_size)
    }

    /// Sealed bytes per token under `policy` (what `GET /v1/kv_policies` advertises).
    pub fn bytes_per_token(&self, policy: &KvPolicy) -> f64 {
        self.sealed(policy) as f64 / self.block_size as f64
    }
}

impl<B: Backend> PagedKv<B> {
    /// Sizes the pool and registers `tenants`. On a device with memory of its own the bytes
    /// come from [`device_budget`] (measured against what the weights and `engine`'s largest
    /// step leave; returned for the log), on the host from `kv.cache_bytes` or the machine.
    pub fn new(
        model: &Llama<B>,
        kv: &KvSection,
        engine: &EngineSection,
        tenants: &[TenantConfig],
    ) -> Result<(Self, Option<DeviceBudget>), ConfigError> {
        let budget = device_budget(model, kv, engine)?;
        let bytes = match &budget {
            Some(b) => usize::try_from(b.kv_bytes).unwrap_or(usize::MAX),
            None => kv.resolved_cache_bytes() as usize,
        };
        Ok((Self::with_bytes(model, kv, tenants, bytes)?, budget))
    }

    /// A pool of room for exactly `num_blocks` exact (filling) blocks (tests, tools).
    pub fn with_blocks(
        model: &Llama<B>,
        kv: &KvSection,
        tenants: &[TenantConfig],
        num_blocks: usize,
    ) -> Result<Self, ConfigError> {
        let bytes = num_blocks * model.kv_bytes_per_block(kv.block_size);
        Self::with_bytes(model, kv, tenants, bytes)
    }

    /// One mixed pool of `bytes` bytes: blocks of every policy share it, each weighing its own
    /// bytes. Tenant quotas in the config are in `bf16` blocks (`reserved_blocks = 10` holds
    /// 160 tokens under `bf16`, ~3× more under `kivi4`).
    pub fn with_bytes(
        model: &Llama<B>,
        kv: &KvSection,
        tenants: &[TenantConfig],
        bytes: usize,
    ) -> Result<Self, ConfigError> {
        let invalid = |e: crate::kv::KvError| ConfigError::Invalid(e.to_string());
        let classes = KvClasses::for_model(model, kv.block_size);
        let filling = model.kv_bytes_per_block(kv.block_size);
        if bytes < filling {
            return Err(ConfigError::Invalid(format!(
                "kv.cache_bytes holds no block of {filling} bytes"
            )));
        }
        let num_ids = bytes / classes.lightest() + 1;
        let mut cfg = KvPoolConfig::new(num_ids, kv.secret_bytes()?);
        cfg.capacity = bytes;
        cfg.block_size = kv.block_size;
        let mut pool = KvPool::new(cfg).map_err(invalid)?;
        let quota_block = classes.class(&KvPolicy::format(Codec::Bf16)).sealed;
        let units = |blocks: usize| blocks.saturating_mul(quota_block).min(bytes);
        for (i, t) in tenants.iter().enumerate() {
            let max_blocks = if t.max_blocks == 0 {
                bytes
            } else {
                units(t.max_blocks)
            };
            let quota = TenantQuota {
                reserved_blocks: units(t.reserved_blocks),
                max_blocks,
                cached_floor: units(t.cached_floor),
                share_group: t.share_group.clone(),
            };
            pool.register_tenant(TenantId(i as u32), quota)
                .map_err(|e| ConfigError::Invalid(format!("tenant `{}`: {e}", t.name)))?;
        }
        let store = model.new_kv_store(num_ids, kv.block_size);
        Ok(Self {
            pool,
            store,
            classes,
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

    /// Tenant names in `TenantId` order (metrics labels).
    pub fn tenant_names(&self) -> &[String] {
        &self.tenant_names
    }

    /// Each tenant's fair-share weight, for the scheduler.
    pub fn weights(&self) -> Vec<(TenantId, f64)> {
        self.weights.clone()
    }

    /// Brings the store up to the pool's decisions; call before every forward: the
    /// copy-on-write copies the pool queued, then the memory of the blocks it freed (after the
    /// copies: taking them can free a copy's source).
    pub fn sync_store(&mut self, backend: &B) {
        let copies = self.pool.take_copies();
        if !copies.is_empty() {
            backend.copy_blocks(&mut self.store, &copies);
        }
        let freed = self.pool.take_freed();
        if !freed.is_empty() {
            backend.forget_blocks(&mut self.store, &freed);
        }
    }
}
