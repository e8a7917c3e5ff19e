//! The one place that wires the layers together (DESIGN §3): configuration and tenants → model
//! → KV pool → engine → HTTP state. `main` and the integration tests both start the server
//! through [`Server::start`] and [`crate::http::serve`].

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::config::{Config, ConfigError};
use crate::engine::device_budget::DeviceBudget;
use crate::engine::paged::PagedKv;
use crate::engine::Engine;
use crate::error::ModelError;
use crate::http::kv::KvCatalog;
use crate::http::{AppState, ModelInfo};
use crate::kv::policy::KvPolicy;
use crate::metrics::Metrics;
use crate::model::llama::Llama;
use crate::model::loader;
use crate::tenancy::Tenancy;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A loaded model with its engine running, ready to serve. Dropping it drains the engine
/// (accepted requests finish) and stops its thread.
pub struct Server {
    pub state: Arc<AppState>,
    /// How the KV pool was sized on a device with memory of its own (`None` on the CPU).
    pub kv_budget: Option<DeviceBudget>,
    engine: Engine,
}

impl Server {
    /// [`Server::start_on`] the CPU backend.
    pub fn start(cfg: &Config, tenancy: Tenancy) -> Result<Self, StartError> {
        Self::start_on(cfg, tenancy, CpuBackend::new())
    }

    /// Loads the model named by `cfg.model.path` onto `backend`, sizes the KV pool, starts the
    /// engine. `tenancy` comes from a tenants file, or is [`Tenancy::open`] (one tenant, no
    /// keys).
    pub fn start_on<B>(cfg: &Config, tenancy: Tenancy, backend: B) -> Result<Self, StartError>
    where
        B: Backend + 'static,
        Llama<B>: Send + Sync,
        B::KvStore: Send,
    {
        let t0 = std::time::Instant::now();
        let files = loader::open_with(&cfg.model.path, cfg.model.weights)?;
        let mut model = Llama::from_files(&files, backend)?;
        crate::calibrate::attach_files(&mut model, &cfg.model.path, &cfg.kv.calibrations)?;
        let supports = served_policies(&model);
        for i in 0..tenancy.len() {
            let id = crate::types::TenantId(i as u32);
            let (t, kv) = (tenancy.get(id), tenancy.kv(id));
            if let (Some(t), Some(kv)) = (t, kv) {
                if !supports(&kv.default) {
                    let why = match kv.default.codec.and_then(|c| c.latent_rank()) {
                        Some(r) => format!("no `kv.calibrations` file of rank {r} is loaded"),
                        None => format!("the {} backend does not serve it", model.backend().name()),
                    };
                    return Err(ConfigError::Invalid(format!(
                        "tenant `{}`: KV policy `{}` is not served: {why}",
                        t.id, kv.default
                    ))
                    .into());
                }
            }
        }
        let tenant_cfgs = tenancy.tenant_configs();
        let (kv, budget) = PagedKv::new(&model, &cfg.kv, &cfg.engine, &tenant_cfgs)?;
        if let Some(b) = &budget {
            tracing::info!(
                kv_bytes = b.kv_bytes,
                total = b.total,
                working = b.working,
                "{}",
                crate::engine::device_budget::describe(b)
            );
        }
        tracing::info!(
            ms = t0.elapsed().as_millis() as u64,
            blocks = kv.pool.num_blocks(),
            block_size = cfg.kv.block_size,
            tenants = tenancy.len(),
            weights = %model.weights_summary(),
            "model loaded"
        );
        let name = if cfg.server.served_model_name.is_empty() {
            cfg.model
                .path
                .file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
        } else {
            cfg.server.served_model_name.clone()
        };
        let info = ModelInfo {
            name,
            vocab_size: files.config.vocab_size,
            max_context: files.config.max_position_embeddings,
            eos_token_ids: files.config.eos_token_ids.clone(),
            tokenizer: files.tokenizer,
            template: files.chat_template.map(|t| {
                t.with_limits(
                    Some(crate::model::chat_template::DEFAULT_FUEL),
                    cfg.server.max_template_bytes,
                )
            }),
            created: crate::http::routes::unix_now(),
        };
        let ranks: Vec<u16> = model.latent_keys().iter().map(|k| k.rank).collect();
        let catalog = KvCatalog::new(kv.classes.clone(), supports, &ranks);
        let weights = kv.weights();
        let metrics = Arc::new(Metrics::new(kv.tenant_names().to_vec()));
        let engine =
            Engine::start_with_metrics(Arc::new(model), kv, &cfg.engine, weights, metrics.clone());
        let state = Arc::new(AppState::new(
            info,
            engine.handle(),
            tenancy,
            cfg.server.clone(),
            metrics,
            catalog,
        ));
        Ok(Self {
            state,
            kv_budget: budget,
            engine,
        })
    }

    /// Finishes accepted requests and stops the engine thread.
    pub fn shutdown(self) {
        self.engine.shutdown();
    }
}

/// Which policies `model` serves, as a `'static` predicate (the model itself moves into the
/// engine): asked once per combination of format, window and quest.
fn served_policies<B: Backend>(
    model: &Llama<B>,
) -> impl Fn(&KvPolicy) -> bool + Send + Sync + 'static {
    let mut served = Vec::new();
    for codec in std::iter::once(None).chain(model.codecs().into_iter().map(Some)) {
        for window in [None, Some(1)] {
            for quest in [None, Some(1)] {
                let p = KvPolicy {
                    codec,
                    window,
                    quest,
                };
                if model.serves_policy(&p) {
                    served.push((codec, window.is_some(), quest.is_some()));
                }
            }
        }
    }
    move |p: &KvPolicy| served.contains(&(p.codec, p.window.is_some(), p.quest.is_some()))
}
