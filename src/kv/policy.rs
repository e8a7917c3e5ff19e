//! KV cache policies: the names clients and tenants files give (`kv_policy`, parsed and checked
//! here so that a typo is a clear error; compositions join parts with `+`, e.g.
//! `kivi4+quest:1024`) and their resolved form [`KvPolicy`], which every forward step carries
//! to the backend.
//!
//! A policy has up to three independent parts:
//! - a storage format ([`Codec`]) for *sealed* blocks: a block is written exactly while it
//!   fills and encoded when its last token lands, so its content is a pure function of (model,
//!   policy, prefix tokens) and prefix sharing keeps working;
//! - `window:W` — StreamingLLM on blocks: the first block (attention sinks) and the last
//!   ⌈W/block⌉+1 blocks stay; older blocks leave the sequence (memory stops growing);
//! - `quest:B` — read side only: decode attends to the blocks with the highest upper bound of
//!   `q·k` (from per-block key min/max stored at seal time) within a budget of B tokens.
//!
//! - `mhc:R` (experimental) — keys as one calibrated low-rank latent per token across the KV
//!   heads (`kvserve calibrate`, `backend::latent`), values quantized: `int8` by default, or the
//!   format named with it (`mhc:64+kivi4`, `mhc:64+bf16`). Served only where the model has a
//!   projection of rank R.

use std::fmt;

use crate::backend::codec::{Codec, MhcValues};

/// One part of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyPart {
    Bf16,
    Int8,
    Kivi4,
    Kivi2,
    K8v4,
    /// Cross-head low-rank keys of this rank.
    Mhc(u32),
    /// Sliding window of this many tokens (plus attention sinks).
    Window(u32),
    /// Read-side top-block selection within this token budget.
    Quest(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPolicySpec {
    pub parts: Vec<PolicyPart>,
}

/// The policies this server advertises (`GET /v1/kv_policies`); compositions of a format with
/// `window:W` and/or `quest:B` are accepted too.
pub const AVAILABLE: &[&str] = &[
    "bf16",
    "int8",
    "k8v4",
    "kivi4",
    "kivi2",
    "bf16+window:1024",
    "kivi4+window:1024",
    "bf16+quest:512",
    "kivi4+quest:512",
];

impl KvPolicySpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() || s.len() > 64 {
            return Err("`kv_policy` must be a policy name such as `bf16`".into());
        }
        let mut parts = Vec::new();
        for p in s.split('+') {
            let (name, arg) = match p.split_once(':') {
                Some((n, a)) => (n, Some(a)),
                None => (p, None),
            };
            let num = |what: &str| -> Result<u32, String> {
                arg.and_then(|a| a.parse::<u32>().ok())
                    .filter(|&v| v > 0)
                    .ok_or_else(|| format!("`{name}` needs a positive {what}, e.g. `{name}:64`"))
            };
            let part = match (name, arg) {
                ("bf16", None) => PolicyPart::Bf16,
                ("int8", None) => PolicyPart::Int8,
                ("kivi4", None) => PolicyPart::Kivi4,
                ("kivi2", None) => PolicyPart::Kivi2,
                ("k8v4", None) => PolicyPart::K8v4,
                ("mhc", _) => PolicyPart::Mhc(num("rank").and_then(|r| {
                    (r <= u32::from(u16::MAX))
                        .then_some(r)
                        .ok_or_else(|| "`mhc` rank too large".to_string())
                })?),
                ("window", _) => PolicyPart::Window(num("token count")?),
                ("quest", _) => PolicyPart::Quest(num("token budget")?),
                _ => return Err(format!("unknown KV policy `{p}`")),
            };
            if parts.contains(&part) {
                return Err(format!("`{p}` is repeated"));
            }
            parts.push(part);
        }
        let formats = parts
            .iter()
            .filter(|p| {
                matches!(
                    p,
                    PolicyPart::Bf16
                        | PolicyPart::Int8
                        | PolicyPart::Kivi4
                        | PolicyPart::Kivi2
                        | PolicyPart::K8v4
                )
            })
            .count();
        if formats > 1 {
            return Err(format!("`{s}` names more than one storage format"));
        }
        Ok(Self { parts })
    }

    /// Refuses policies this build cannot serve yet.
    pub fn check_available(self) -> Result<Self, String> {
        KvPolicy::from_spec(&self).map(|_| self)
    }

    /// The resolved policy (the format defaults to `bf16` when only `window`/`quest` is named).
    pub fn resolve(&self) -> Result<KvPolicy, String> {
        KvPolicy::from_spec(self)
    }
}

pub use crate::backend::kv_policy::{KvPolicy, QUEST_DENSE_LAYERS};

impl KvPolicy {
    pub fn parse(s: &str) -> Result<Self, String> {
        KvPolicySpec::parse(s)?.resolve()
    }

    fn from_spec(spec: &KvPolicySpec) -> Result<Self, String> {
        let mut p = KvPolicy {
            codec: None,
            window: None,
            quest: None,
        };
        for part in &spec.parts {
            match *part {
                PolicyPart::Bf16 => p.codec = Some(Codec::Bf16),
                PolicyPart::Int8 => p.codec = Some(Codec::Int8),
                PolicyPart::Kivi4 => p.codec = Some(Codec::Kivi4),
                PolicyPart::Kivi2 => p.codec = Some(Codec::Kivi2),
                PolicyPart::K8v4 => p.codec = Some(Codec::K8v4),
                PolicyPart::Window(w) => p.window = Some(w),
                PolicyPart::Quest(b) => p.quest = Some(b),
                PolicyPart::Mhc(_) => {}
            }
        }
        if let Some(rank) = spec.parts.iter().find_map(|p| match p {
            PolicyPart::Mhc(r) => Some(*r as u16),
            _ => None,
        }) {
            let values = match p.codec {
                None | Some(Codec::Int8) => MhcValues::Int8,
                Some(Codec::Kivi4) => MhcValues::Kivi4,
                Some(Codec::Bf16) => MhcValues::Bf16,
                Some(other) => {
                    return Err(format!(
                        "`{spec}`: `mhc` stores values as `int8` (default), `kivi4` or `bf16`, \
                         not `{}`",
                        other.name()
                    ))
                }
            };
            p.codec = Some(Codec::Mhc { rank, values });
        }
        p.codec.get_or_insert(Codec::Bf16);
        Ok(p)
    }
}

impl fmt::Display for KvPolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self
            .parts
            .iter()
            .map(|p| match p {
                PolicyPart::Bf16 => "bf16".into(),
                PolicyPart::Int8 => "int8".into(),
                PolicyPart::Kivi4 => "kivi4".into(),
                PolicyPart::Kivi2 => "kivi2".into(),
                PolicyPart::K8v4 => "k8v4".into(),
                PolicyPart::Mhc(r) => format!("mhc:{r}"),
                PolicyPart::Window(w) => format!("window:{w}"),
                PolicyPart::Quest(b) => format!("quest:{b}"),
            })
            .collect();
        f.write_str(&names.join("+"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_compose_and_round_trip() {
        for s in [
            "bf16",
            "int8",
            "k8v4",
            "mhc:64+int8",
            "kivi4+quest:1024",
            "window:512",
        ] {
            assert_eq!(KvPolicySpec::parse(s).unwrap().to_string(), s);
        }
        for bad in [
            "",
            "fp4",
            "mhc",
            "mhc:0",
            "window:x",
            "int8+kivi4",
            "int8+int8",
            "bf16:3",
        ] {
            assert!(KvPolicySpec::parse(bad).is_err(), "{bad}");
        }
        assert!(KvPolicySpec::parse("bf16")
            .unwrap()
            .check_available()
            .is_ok());
        // `mhc` takes its value format from the composition (int8 by default).
        for (s, canonical) in [
            ("mhc:64", "mhc:64+int8"),
            ("mhc:64+int8", "mhc:64+int8"),
            ("kivi4+mhc:32+quest:256", "mhc:32+kivi4+quest:256"),
            ("mhc:96+bf16", "mhc:96+bf16"),
        ] {
            assert_eq!(KvPolicy::parse(s).unwrap().to_string(), canonical);
        }
        let e = KvPolicy::parse("mhc:64+kivi2").unwrap_err();
        assert!(e.contains("int8") && e.contains("kivi4"), "{e}");
        assert!(KvPolicySpec::parse("mhc:70000").is_err());
    }

    #[test]
    fn resolved_policies_name_and_key_their_content() {
        let p = KvPolicy::parse("quest:512+kivi4").unwrap();
        assert_eq!(p.to_string(), "kivi4+quest:512");
        assert_eq!(
            KvPolicy::parse("window:100").unwrap().to_string(),
            "bf16+window:100"
        );
        assert_eq!(
            KvPolicy::parse("window:100").unwrap().window_blocks(16),
            Some(8)
        );
        // Content ids: distinct per format and per bounds, equal across quest budgets.
        let ids: Vec<u32> = [
            "bf16",
            "int8",
            "kivi4",
            "kivi2",
            "k8v4",
            "kivi4+quest:64",
            "mhc:64",
            "mhc:64+kivi4",
            "mhc:32",
        ]
        .iter()
        .map(|s| KvPolicy::parse(s).unwrap().content_id())
        .collect();
        for (i, a) in ids.iter().enumerate() {
            assert_ne!(*a, 0);
            assert!(!ids[..i].contains(a), "{ids:?}");
        }
        assert_eq!(
            KvPolicy::parse("kivi4+quest:64").unwrap().content_id(),
            KvPolicy::parse("kivi4+quest:1024").unwrap().content_id()
        );
        assert_eq!(KvPolicy::EXACT.content_id(), 0);
        // mhc:64 on SmolLM2 (30 layers, 3 KV heads × 64): per layer a 16 × 64 bf16 latent and
        // three int8 value runs.
        let mhc = KvPolicy::parse("mhc:64").unwrap();
        assert_eq!(
            mhc.sealed_bytes_per_block(30, 3, 16, 64),
            Some(30 * (2048 + 3 * 1056))
        );
        for s in AVAILABLE {
            assert!(KvPolicy::parse(s).is_ok(), "{s}");
        }
    }
}
