//! KV cache policy names as clients and tenants files give them (`kv_policy`): parsed and
//! checked here so that a typo is a clear error. Compositions join parts with `+`
//! (`mhc:64+int8`, `kivi4+quest:1024`). Only `bf16` runs today; the compressed formats are the
//! next piece of work, and asking for one is refused rather than silently served as `bf16`.

use std::fmt;

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

/// The policies this build can serve.
pub const AVAILABLE: &[&str] = &["bf16"];

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
                ("mhc", _) => PolicyPart::Mhc(num("rank")?),
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
        if self.parts == [PolicyPart::Bf16] {
            Ok(self)
        } else {
            Err(format!(
                "KV policy `{self}` is not available on this server yet (available: {})",
                AVAILABLE.join(", ")
            ))
        }
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
        let e = KvPolicySpec::parse("int8")
            .unwrap()
            .check_available()
            .unwrap_err();
        assert!(e.contains("not available") && e.contains("bf16"), "{e}");
    }
}
