//! Tenants and their API keys: who a caller is (authenticated from an API key, never from a
//! request field) and what it may use (fair-share weight, KV quota, rate limits, default KV
//! policy).
//!
//! The tenants file is TOML, one `[[tenant]]` table each (see `config/tenants.example.toml`).
//! Keys are stored only as SHA-256 hex digests (`kvserve hash-key KEY` prints one). A presented
//! key is hashed and compared against every stored digest in constant time, without an early
//! exit, so neither the comparison nor which tenant matched shows in the response time.
//! Without a tenants file the server has one implicit tenant and no authentication.

use crate::config::{ConfigError, TenantConfig};
use crate::kv::policy::KvPolicy;
use crate::types::TenantId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// One tenant as the operator declares it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantEntry {
    pub id: String,
    /// SHA-256 hex digests of the tenant's API keys.
    #[serde(default)]
    pub api_keys_sha256: Vec<String>,
    /// Fair-share weight.
    #[serde(default = "one")]
    pub weight: f64,
    /// KV blocks guaranteed to this tenant.
    #[serde(default)]
    pub reserved_blocks: usize,
    /// KV blocks it may hold at most; 0 = the whole pool.
    #[serde(default)]
    pub max_blocks: usize,
    /// Cached blocks protected from other tenants' eviction pressure.
    #[serde(default)]
    pub cached_floor: usize,
    /// Requests per minute; 0 = unlimited.
    #[serde(default)]
    pub requests_per_minute: u32,
    /// Prompt + completion tokens per minute; 0 = unlimited.
    #[serde(default)]
    pub tokens_per_minute: u64,
    /// Requests in flight at once; 0 = unlimited.
    #[serde(default)]
    pub max_concurrent: u32,
    /// Default KV policy of the tenant's requests.
    #[serde(default = "bf16")]
    pub kv_policy: String,
    /// Policies a request's `kv_policy` may name; empty = any the server serves.
    #[serde(default)]
    pub kv_policies_allowed: Vec<String>,
    /// Tried in order when a request does not fit under its policy (it would wait, or never
    /// fit): it is admitted under the first that fits instead, and its `usage.kv` says so.
    #[serde(default)]
    pub kv_policy_fallback: Vec<String>,
    /// Operator-declared groups whose cached prefixes this tenant shares.
    #[serde(default)]
    pub share_groups: Vec<String>,
}

fn one() -> f64 {
    1.0
}

fn bf16() -> String {
    "bf16".into()
}

/// A tenant's KV policies, parsed from its entry (a typo is an error at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantKv {
    /// Used when a request names none.
    pub default: KvPolicy,
    /// What a request may name; empty = any policy the server serves.
    pub allowed: Vec<KvPolicy>,
    pub fallbacks: Vec<KvPolicy>,
}

impl Default for TenantKv {
    fn default() -> Self {
        Self {
            default: KvPolicy::format(crate::kv::codec::Codec::Bf16),
            allowed: Vec::new(),
            fallbacks: Vec::new(),
        }
    }
}

impl TenantKv {
    fn parse(t: &TenantEntry) -> Result<Self, String> {
        let one = |s: &str, what: &str| KvPolicy::parse(s).map_err(|e| format!("{what}: {e}"));
        let many = |v: &[String], what: &str| -> Result<Vec<KvPolicy>, String> {
            v.iter().map(|s| one(s, what)).collect()
        };
        Ok(Self {
            default: one(&t.kv_policy, "kv_policy")?,
            allowed: many(&t.kv_policies_allowed, "kv_policies_allowed")?,
            fallbacks: many(&t.kv_policy_fallback, "kv_policy_fallback")?,
        })
    }

    /// Whether a request of this tenant may name `p`.
    pub fn allows(&self, p: &KvPolicy) -> bool {
        self.allowed.is_empty() || self.allowed.contains(p) || *p == self.default
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default)]
    tenant: Vec<TenantEntry>,
}

/// Why a caller was refused (mapped to 401 by the HTTP layer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`")]
    Missing,
    #[error("invalid API key")]
    Invalid,
}

/// The server's tenants, indexed by `TenantId` (their order in the file).
#[derive(Debug, Clone)]
pub struct Tenancy {
    tenants: Vec<TenantEntry>,
    /// (digest, tenant) for every key.
    keys: Vec<([u8; 32], TenantId)>,
    /// No tenants file: one implicit tenant, no authentication.
    open: bool,
    /// Each tenant's KV policies, parsed (same order as `tenants`).
    kv: Vec<TenantKv>,
}

/// SHA-256 of `key` as lowercase hex (what a tenants file stores).
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, byte) in d.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(d)
}

impl Tenancy {
    /// One implicit tenant built from the config's first tenant, no authentication.
    pub fn open(tenants: &[TenantConfig]) -> Self {
        let t = tenants.first().cloned().unwrap_or_default();
        Self {
            tenants: vec![TenantEntry {
                id: t.name,
                api_keys_sha256: Vec::new(),
                weight: t.weight,
                reserved_blocks: t.reserved_blocks,
                max_blocks: t.max_blocks,
                cached_floor: t.cached_floor,
                requests_per_minute: 0,
                tokens_per_minute: 0,
                max_concurrent: 0,
                kv_policy: bf16(),
                kv_policies_allowed: Vec::new(),
                kv_policy_fallback: Vec::new(),
                share_groups: t.share_group.into_iter().collect(),
            }],
            kv: vec![TenantKv::default()],
            keys: Vec::new(),
            open: true,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml(&crate::config::read_file(path)?, path)
    }

    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse = |msg: String| ConfigError::Parse {
            path: PathBuf::from(path),
            msg,
        };
        let file: TenantsFile = toml::from_str(text).map_err(|e| parse(e.to_string()))?;
        if file.tenant.is_empty() {
            return Err(parse("no [[tenant]] table".into()));
        }
        let mut keys: Vec<([u8; 32], TenantId)> = Vec::new();
        let mut kv = Vec::new();
        for (i, t) in file.tenant.iter().enumerate() {
            let bad = |why: &str| parse(format!("tenant `{}`: {why}", t.id));
            if t.id.is_empty() || file.tenant[..i].iter().any(|u| u.id == t.id) {
                return Err(bad("ids must be non-empty and unique"));
            }
            if !(t.weight.is_finite() && t.weight > 0.0) {
                return Err(bad("weight must be a positive number"));
            }
            if t.max_blocks != 0 && t.reserved_blocks > t.max_blocks {
                return Err(bad("reserved_blocks > max_blocks"));
            }
            if t.share_groups.len() > 1 {
                return Err(bad("at most one share group per tenant is supported"));
            }
            kv.push(TenantKv::parse(t).map_err(|e| bad(&e))?);
            if t.api_keys_sha256.is_empty() {
                return Err(bad(
                    "no api_keys_sha256: the tenant could never authenticate",
                ));
            }
            for h in &t.api_keys_sha256 {
                let d = parse_digest(h)
                    .ok_or_else(|| bad("api_keys_sha256 entries must be 64 hex digits"))?;
                if keys.iter().any(|(k, _)| *k == d) {
                    return Err(bad("an API key is listed twice"));
                }
                keys.push((d, TenantId(i as u32)));
            }
        }
        Ok(Self {
            tenants: file.tenant,
            kv,
            keys,
            open: false,
        })
    }

    /// Whether requests need no API key (no tenants file).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The tenant a presented API key belongs to. Hashes the key and compares it against every
    /// stored digest in constant time, visiting all of them whatever matches.
    pub fn authenticate(&self, key: Option<&str>) -> Result<TenantId, AuthError> {
        if self.open {
            return Ok(TenantId(0));
        }
        let key = key.ok_or(AuthError::Missing)?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found: u32 = u32::MAX;
        for (d, t) in &self.keys {
            let hit = d.ct_eq(&digest);
            // Branch-free select of the matching tenant.
            found = u32::conditional_select(&found, &t.0, hit);
        }
        if found == u32::MAX {
            Err(AuthError::Invalid)
        } else {
            Ok(TenantId(found))
        }
    }

    pub fn get(&self, t: TenantId) -> Option<&TenantEntry> {
        self.tenants.get(t.0 as usize)
    }

    /// The tenant's KV policies, resolved at load.
    pub fn kv(&self, t: TenantId) -> Option<&TenantKv> {
        self.kv.get(t.0 as usize)
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// The KV quotas and weights, in `TenantId` order, for the KV pool and the scheduler.
    pub fn tenant_configs(&self) -> Vec<TenantConfig> {
        self.tenants
            .iter()
            .map(|t| TenantConfig {
                name: t.id.clone(),
                reserved_blocks: t.reserved_blocks,
                max_blocks: t.max_blocks,
                cached_floor: t.cached_floor,
                share_group: t.share_groups.first().cloned(),
                weight: t.weight,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(keys: &[(&str, &[&str])]) -> String {
        keys.iter()
            .map(|(id, ks)| {
                let hashes: Vec<String> =
                    ks.iter().map(|k| format!("\"{}\"", hash_key(k))).collect();
                format!(
                    "[[tenant]]\nid = \"{id}\"\napi_keys_sha256 = [{}]\n",
                    hashes.join(", ")
                )
            })
            .collect()
    }

    #[test]
    fn hash_key_is_sha256_hex() {
        // sha256("abc"), FIPS 180-2 test vector.
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn keys_map_to_their_tenant_and_others_are_refused() {
        let t = Tenancy::from_toml(
            &file(&[("a", &["ka1", "ka2"]), ("b", &["kb"])]),
            Path::new("t.toml"),
        )
        .unwrap();
        assert!(!t.is_open());
        assert_eq!(t.authenticate(Some("ka1")), Ok(TenantId(0)));
        assert_eq!(t.authenticate(Some("ka2")), Ok(TenantId(0)));
        assert_eq!(t.authenticate(Some("kb")), Ok(TenantId(1)));
        assert_eq!(t.authenticate(Some("kc")), Err(AuthError::Invalid));
        assert_eq!(t.authenticate(Some("")), Err(AuthError::Invalid));
        assert_eq!(t.authenticate(None), Err(AuthError::Missing));
        let cfgs = t.tenant_configs();
        assert_eq!(cfgs[1].name, "b");
        assert_eq!(cfgs[1].weight, 1.0);
        assert_eq!(t.get(TenantId(0)).unwrap().kv_policy, "bf16");
    }

    #[test]
    fn bad_files_are_errors() {
        let p = Path::new("t.toml");
        let dup_id = file(&[("a", &["k1"]), ("a", &["k2"])]);
        assert!(Tenancy::from_toml(&dup_id, p).is_err());
        let dup_key = file(&[("a", &["k1"]), ("b", &["k1"])]);
        assert!(Tenancy::from_toml(&dup_key, p).is_err());
        assert!(Tenancy::from_toml("[[tenant]]\nid = \"a\"\n", p).is_err()); // no keys
        let short = "[[tenant]]\nid = \"a\"\napi_keys_sha256 = [\"abcd\"]\n";
        assert!(Tenancy::from_toml(short, p).is_err());
        let typo = format!("{}wieght = 2\n", file(&[("a", &["k"])]));
        assert!(Tenancy::from_toml(&typo, p)
            .unwrap_err()
            .to_string()
            .contains("wieght"));
        let w = format!("{}weight = 0\n", file(&[("a", &["k"])]));
        assert!(Tenancy::from_toml(&w, p).is_err());
        assert!(Tenancy::from_toml("", p).is_err());
    }

    #[test]
    fn without_a_file_one_open_tenant() {
        let t = Tenancy::open(&[TenantConfig::default()]);
        assert!(t.is_open());
        assert_eq!(t.len(), 1);
        assert_eq!(t.authenticate(None), Ok(TenantId(0)));
        assert_eq!(t.authenticate(Some("anything")), Ok(TenantId(0)));
    }

    #[test]
    fn the_example_file_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tenants.example.toml");
        let t = Tenancy::from_file(&p).unwrap();
        assert!(t.len() >= 2);
    }
}
