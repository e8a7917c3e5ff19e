//! The typed configuration tree, loaded once (`config/default.toml` mirrors
//! [`Config::default`]; a test keeps them equal) and handed down in pieces. Unknown keys are
//! errors, so a typo never silently falls back to a default. Secrets are masked in `Debug`.

use crate::model::loader::WeightFormat;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    Parse { path: PathBuf, msg: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerSection,
    pub model: ModelSection,
    pub kv: KvSection,
    pub engine: EngineSection,
    /// Tenants and their KV quotas. A server with none configured serves one `default` tenant.
    pub tenants: Vec<TenantConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerSection::default(),
            model: ModelSection::default(),
            kv: KvSection::default(),
            engine: EngineSection::default(),
            tenants: vec![TenantConfig::default()],
        }
    }
}

/// The HTTP server: where it listens, how it drains, and the bounds every request is held to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Without a tenants file (no authentication) only a loopback address is allowed unless
    /// `allow_open` is set.
    pub host: String,
    pub port: u16,
    /// Serve without API keys on a non-loopback address (trusted networks only).
    pub allow_open: bool,
    /// The model id clients send and see; empty = the model directory's name.
    pub served_model_name: String,
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// After SIGTERM, in-flight requests get this long to finish before the process exits.
    pub drain_timeout_secs: u64,
    /// After the engine fails for good (its device is lost or hangs, its loop panicked), the server
    /// answers this long (`/health` and `/ready` 503, generations 503 `engine_failed`) so that
    /// load balancers and scrapers see why, then exits with status 1 for its supervisor to
    /// restart it. 0 exits at once.
    pub failure_exit_secs: u64,
    /// Upper bounds on request fields (400 above them).
    pub max_n: usize,
    pub max_tokens: usize,
    pub max_stop_sequences: usize,
    pub max_stop_bytes: usize,
    pub max_logit_bias: usize,
    pub max_top_logprobs: usize,
    pub max_messages: usize,
    /// Prompts per completions request (a list of prompts is a batch).
    pub max_prompts: usize,
    /// Seconds a connection may take to send a request's headers (also closes idle keep-alive
    /// connections); a slower client is disconnected without a response.
    pub header_read_timeout_secs: u64,
    /// Seconds after the headers within which the whole body must arrive (408 otherwise).
    pub body_read_timeout_secs: u64,
    /// Seconds a response write may make no progress (the client stopped reading) before the
    /// connection is closed and its requests are aborted.
    pub write_stall_timeout_secs: u64,
    /// Largest prompt the chat template may render, in bytes (400 above it).
    pub max_template_bytes: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            allow_open: false,
            served_model_name: String::new(),
            max_body_bytes: 4 << 20,
            drain_timeout_secs: 30,
            failure_exit_secs: 5,
            max_n: 16,
            max_tokens: 8192,
            max_stop_sequences: 8,
            max_stop_bytes: 256,
            max_logit_bias: 1024,
            max_top_logprobs: 20,
            max_messages: 1024,
            max_prompts: 64,
            header_read_timeout_secs: 30,
            body_read_timeout_secs: 60,
            write_stall_timeout_secs: 60,
            max_template_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A Hugging Face directory or a `.gguf` file.
    pub path: PathBuf,
    /// How a `.gguf` file's quantized matrices are held (`native`: as stored, where the backend
    /// multiplies with them; `bf16`: dequantized and rounded, as `kvserve convert` writes them).
    pub weights: WeightFormat,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: PathBuf::from("models/SmolLM2-135M-Instruct"),
            weights: WeightFormat::default(),
        }
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvSection {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Bytes of KV memory for the whole pool; 0 sizes it to the machine: on the CPU a quarter
    /// of the available memory, at most 8 GiB; on a GPU what `gpu_memory_utilization` of the
    /// device leaves after the weights and a step's working memory (measured at start).
    pub cache_bytes: u64,
    /// On a GPU with `cache_bytes` 0: the share of the device's memory kvserve may use (vLLM's
    /// `gpu_memory_utilization`); the rest stays free for the driver and other processes.
    pub gpu_memory_utilization: f64,
    /// Server secret (64 hex digits) that keys each tenant's cache scope; empty generates one at
    /// start (prefix caches then do not survive a restart, which is the safe default).
    pub secret: String,
    /// `kvserve calibrate` projection files: each serves `mhc:R` for its rank. A file made for
    /// another model, or a corrupt one, stops the server at start.
    pub calibrations: Vec<PathBuf>,
}

impl Default for KvSection {
    fn default() -> Self {
        Self {
            block_size: 16,
            cache_bytes: 0,
            gpu_memory_utilization: 0.9,
            secret: String::new(),
            calibrations: Vec::new(),
        }
    }
}

impl fmt::Debug for KvSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvSection")
            .field("block_size", &self.block_size)
            .field("cache_bytes", &self.cache_bytes)
            .field("gpu_memory_utilization", &self.gpu_memory_utilization)
            .field("secret", &if self.secret.is_empty() { "" } else { "***" })
            .field("calibrations", &self.calibrations)
            .finish()
    }
}

impl KvSection {
    /// The pool size in bytes, resolving 0 to a share of this machine's available memory.
    pub fn resolved_cache_bytes(&self) -> u64 {
        if self.cache_bytes > 0 {
            return self.cache_bytes;
        }
        let available = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemAvailable:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map(|kib| kib * 1024)
            .unwrap_or(4 << 30);
        (available / 4).min(8 << 30)
    }

    /// The 32-byte secret: parsed from hex, or freshly generated when empty.
    pub fn secret_bytes(&self) -> Result<[u8; 32], ConfigError> {
        if self.secret.is_empty() {
            let mut s = [0u8; 32];
            rand::fill(&mut s);
            return Ok(s);
        }
        let hex = self.secret.trim();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ConfigError::Invalid(
                "kv.secret must be 64 hex digits (32 bytes)".into(),
            ));
        }
        let mut s = [0u8; 32];
        for (i, byte) in s.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(s)
    }
}

/// The continuous-batching engine's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Tokens computed per step at most (prompt chunks + one per decoding sequence). Bounds the
    /// time of one step, and so the inter-token latency of running streams.
    pub max_batched_tokens: usize,
    /// Sequences in the running batch at most.
    pub max_running: usize,
    /// Requests waiting for admission at most; more are refused as overloaded.
    pub max_waiting: usize,
    /// Milliseconds a request may wait for admission before it is refused as overloaded; 0 = no limit.
    pub max_queue_ms: u64,
    /// Seconds one step (a batched forward pass and its copies) may take before the engine
    /// is declared hung and fails for good (`EngineError::Failed`: a GPU that stopped
    /// answering never returns from a synchronisation); 0 = no limit. vLLM's
    /// `VLLM_ENGINE_ITERATION_TIMEOUT_S` is the same idea, 60 s by default.
    pub step_timeout_secs: u64,
}

impl Default for EngineSection {
    fn default() -> Self {
        Self {
            max_batched_tokens: 256,
            max_running: 64,
            max_waiting: 1024,
            max_queue_ms: 60_000,
            step_timeout_secs: 60,
        }
    }
}

/// One tenant's share of the KV pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantConfig {
    pub name: String,
    /// Blocks guaranteed to this tenant: no other tenant can take them.
    pub reserved_blocks: usize,
    /// Hard cap on blocks in use; 0 means the whole pool.
    pub max_blocks: usize,
    /// Cached (free, reusable) blocks protected from other tenants' eviction pressure.
    pub cached_floor: usize,
    /// Tenants naming the same group share prefix-cache blocks (e.g. a public system prompt).
    pub share_group: Option<String>,
    /// Fair-share weight: under contention a tenant's service is proportional to it.
    pub weight: f64,
}

impl Default for TenantConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            reserved_blocks: 0,
            max_blocks: 0,
            cached_floor: 0,
            share_group: None,
            weight: 1.0,
        }
    }
}

/// Reads a configuration file (config or tenants), naming it in the error.
pub(crate) fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Config {
    /// Reads a TOML file; missing keys take their defaults, unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml(&read_file(path)?, path)
    }

    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kv.block_size == 0 || self.kv.block_size > 1024 {
            return Err(ConfigError::Invalid(
                "kv.block_size must be in 1..=1024".into(),
            ));
        }
        let u = self.kv.gpu_memory_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return Err(ConfigError::Invalid(format!(
                "kv.gpu_memory_utilization must be in (0, 1], got {u}"
            )));
        }
        if self.tenants.is_empty() {
            return Err(ConfigError::Invalid("at least one tenant is needed".into()));
        }
        let mut names: Vec<&str> = self.tenants.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError::Invalid("tenant names must be unique".into()));
        }
        let s = &self.server;
        if s.header_read_timeout_secs == 0
            || s.body_read_timeout_secs == 0
            || s.write_stall_timeout_secs == 0
        {
            return Err(ConfigError::Invalid(
                "server.header_read_timeout_secs, body_read_timeout_secs and \
                 write_stall_timeout_secs must be > 0"
                    .into(),
            ));
        }
        let e = &self.engine;
        if e.max_batched_tokens == 0 || e.max_running == 0 || e.max_waiting == 0 {
            return Err(ConfigError::Invalid(
                "engine.max_batched_tokens, max_running and max_waiting must be > 0".into(),
            ));
        }
        for t in &self.tenants {
            if !(t.weight.is_finite() && t.weight > 0.0) {
                return Err(ConfigError::Invalid(format!(
                    "tenant `{}`: weight must be a positive number",
                    t.name
                )));
            }
            if t.max_blocks != 0 && t.reserved_blocks > t.max_blocks {
                return Err(ConfigError::Invalid(format!(
                    "tenant `{}`: reserved_blocks {} > max_blocks {}",
                    t.name, t.reserved_blocks, t.max_blocks
                )));
            }
        }
        self.kv.secret_bytes()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_mirrors_default_config() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let from_file = Config::from_file(&path).unwrap();
        assert_eq!(from_file, Config::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let p = Path::new("x.toml");
        let e = Config::from_toml("[kv]\nblok_size = 16\n", p).unwrap_err();
        assert!(e.to_string().contains("blok_size"), "{e}");
        assert!(Config::from_toml("[kv]\nblock_size = 0\n", p).is_err());
        assert!(Config::from_toml("[kv]\nsecret = \"abc\"\n", p).is_err());
        let dup = "[[tenants]]\nname = \"a\"\n[[tenants]]\nname = \"a\"\n";
        assert!(Config::from_toml(dup, p).is_err());
        let over = "[[tenants]]\nname = \"a\"\nreserved_blocks = 5\nmax_blocks = 4\n";
        assert!(Config::from_toml(over, p).is_err());
        let weight = "[[tenants]]\nname = \"a\"\nweight = 0.0\n";
        assert!(Config::from_toml(weight, p).is_err());
        assert!(Config::from_toml("[engine]\nmax_running = 0\n", p).is_err());
        let stall = "[server]\nwrite_stall_timeout_secs = 0\n";
        assert!(Config::from_toml(stall, p).is_err());
    }

    #[test]
    fn secret_is_masked_and_parsed() {
        let mut kv = KvSection {
            secret: "ab".repeat(32),
            ..KvSection::default()
        };
        assert!(!format!("{kv:?}").contains("abab"));
        assert_eq!(kv.secret_bytes().unwrap(), [0xab; 32]);
        kv.secret.clear();
        assert_ne!(kv.secret_bytes().unwrap(), kv.secret_bytes().unwrap());
        assert!(KvSection::default().resolved_cache_bytes() > 0);
    }
}
