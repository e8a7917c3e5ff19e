//! KV policies over HTTP: the catalog this server serves (`GET /v1/kv_policies`, with bytes per
//! token and the latest measured quality from the committed eval, `docs/kv-quality.json`), and
//! the choice of a request's policy (its `kv_policy`, else its tenant's default; only policies
//! the tenant allows and the backend serves; the tenant's fallbacks ride along).

use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use crate::engine::paged::KvClasses;
use crate::engine::KvChoice;
use crate::kv::codec::Codec;
use crate::kv::policy::{KvPolicy, AVAILABLE};
use crate::tenancy::TenantKv;

/// The latest committed quality measurement (`kvserve eval`), compiled in.
const MEASURED: &str = include_str!("../../docs/kv-quality.json");

/// One policy as `GET /v1/kv_policies` lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KvPolicyInfo {
    /// The value to send as `kv_policy`.
    pub name: String,
    /// Always `kv_policy`.
    pub object: &'static str,
    /// KV bytes per token once blocks are sealed, all layers, K and V.
    pub bytes_per_token: f64,
    /// `bytes_per_token` / the same under `bf16`.
    pub memory_vs_bf16: f64,
    /// Whether full blocks are shared through the prefix cache (`window` forgets, so no).
    pub prefix_sharing: bool,
    /// Model, date and results of the latest `kvserve eval` of this policy, if any.
    #[schema(value_type = Object)]
    pub measured: Option<serde_json::Value>,
}

/// `{"object": "list", "data": [...]}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KvPolicyList {
    pub object: &'static str,
    pub data: Vec<KvPolicyInfo>,
}

/// Which policies this server serves and what they cost.
pub struct KvCatalog {
    list: KvPolicyList,
    supports: Box<dyn Fn(&KvPolicy) -> bool + Send + Sync>,
    classes: KvClasses,
}

impl KvCatalog {
    /// The advertised policies the model serves (`supports`), weighed by `classes`, plus
    /// `mhc:R` (int8 and kivi4 values) for each calibrated rank in `mhc_ranks`.
    pub fn new(
        classes: KvClasses,
        supports: impl Fn(&KvPolicy) -> bool + Send + Sync + 'static,
        mhc_ranks: &[u16],
    ) -> Self {
        let measured: serde_json::Value =
            serde_json::from_str(MEASURED).unwrap_or(serde_json::Value::Null);
        let bf16 = classes.bytes_per_token(&KvPolicy::format(Codec::Bf16));
        let mhc = mhc_ranks
            .iter()
            .flat_map(|r| [format!("mhc:{r}+int8"), format!("mhc:{r}+kivi4")]);
        let data = AVAILABLE
            .iter()
            .map(|s| s.to_string())
            .chain(mhc)
            .filter_map(|name| KvPolicy::parse(&name).ok())
            .filter(|p| supports(p))
            .map(|p| {
                let bytes = classes.bytes_per_token(&p);
                KvPolicyInfo {
                    name: p.to_string(),
                    object: "kv_policy",
                    bytes_per_token: bytes,
                    memory_vs_bf16: bytes / bf16,
                    prefix_sharing: p.shares_prefix(),
                    measured: measured_for(&measured, &p.to_string()),
                }
            })
            .collect();
        Self {
            list: KvPolicyList {
                object: "list",
                data,
            },
            supports: Box::new(supports),
            classes,
        }
    }

    pub fn list(&self) -> &KvPolicyList {
        &self.list
    }

    pub fn classes(&self) -> &KvClasses {
        &self.classes
    }

    /// The policy a request runs under: its `kv_policy` if the tenant allows it and the
    /// backend serves it, else a 400 naming what is allowed; no `kv_policy` → the tenant's
    /// default. Fallbacks the backend cannot serve are skipped.
    pub fn choose(&self, requested: Option<&str>, tenant: &TenantKv) -> Result<KvChoice, ApiError> {
        let allowed = || {
            if tenant.allowed.is_empty() {
                self.list
                    .data
                    .iter()
                    .map(|i| i.name.clone())
                    .collect::<Vec<_>>()
            } else {
                tenant.allowed.iter().map(|p| p.to_string()).collect()
            }
            .join(", ")
        };
        let policy = match requested {
            None => tenant.default,
            Some(s) => {
                let p = KvPolicy::parse(s).map_err(|e| {
                    ApiError::invalid("kv_policy", format!("{e} (allowed: {})", allowed()))
                })?;
                if !tenant.allows(&p) {
                    return Err(ApiError::invalid(
                        "kv_policy",
                        format!(
                            "KV policy `{p}` is not allowed for this API key (allowed: {})",
                            allowed()
                        ),
                    ));
                }
                p
            }
        };
        if !(self.supports)(&policy) {
            return Err(ApiError::invalid(
                "kv_policy",
                format!(
                    "KV policy `{policy}` is not served by this server's backend (allowed: {})",
                    allowed()
                ),
            ));
        }
        Ok(KvChoice {
            policy,
            fallbacks: tenant
                .fallbacks
                .iter()
                .copied()
                .filter(|p| *p != policy && (self.supports)(p))
                .collect(),
        })
    }
}

/// The eval's entry for `name` with the run's model and date, if the committed eval has it.
fn measured_for(eval: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    let entry = eval
        .get("policies")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(|n| n.as_str()) == Some(name))?;
    Some(serde_json::json!({
        "model": eval.get("model"),
        "date": eval.get("date"),
        "text": eval.get("text").and_then(|t| t.get("path")),
        "results": entry,
    }))
}
