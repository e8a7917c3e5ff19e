//! A resolved KV policy as the backend reads it: the format sealed blocks are stored in, and
//! the window / quest visibility of attention. Names and parsing (`kv_policy` values, tenants
//! files) live in `kv::policy`, which builds these.

use std::fmt;

use super::codec::Codec;

/// A resolved policy: what sealed blocks store and how attention reads them. `Copy`, carried by
/// every forward step; its [`fmt::Display`] is the canonical name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvPolicy {
    /// Format of sealed blocks. `None`: blocks are never sealed and stay in the backend's exact
    /// format (f32 on the CPU) — the oracle path of tests and tools, not offered to clients.
    pub codec: Option<Codec>,
    /// Sliding window in tokens (plus the sink block).
    pub window: Option<u32>,
    /// Quest token budget for decode reads.
    pub quest: Option<u32>,
}

/// Layers attended densely under `quest` (the first layers' attention is broad; Quest and the
/// simulation in shared/research/kv_compression.md §4 keep them dense).
pub const QUEST_DENSE_LAYERS: usize = 2;

impl KvPolicy {
    /// Never sealed, no window, no selection: bit-exact f32 KV.
    pub const EXACT: KvPolicy = KvPolicy {
        codec: None,
        window: None,
        quest: None,
    };

    /// The plain format policy (`bf16`, `int8`, …).
    pub const fn format(codec: Codec) -> Self {
        KvPolicy {
            codec: Some(codec),
            window: None,
            quest: None,
        }
    }

    /// Blocks a windowed sequence keeps besides the sink block: ⌈W/bs⌉ + 1 (the one being
    /// filled included), so every query sees at least W earlier tokens.
    pub fn window_blocks(&self, bs: usize) -> Option<usize> {
        self.window.map(|w| (w as usize).div_ceil(bs) + 1)
    }

    /// Whether sealed blocks carry per-channel key min/max (for `quest`).
    pub fn stores_bounds(&self) -> bool {
        self.quest.is_some() && self.codec.is_some()
    }

    /// Whether sealed blocks are shared through the prefix cache. Windowed sequences are not:
    /// their blocks were computed with earlier tokens forgotten, so they are not the KV of the
    /// prefix they would be keyed by.
    pub fn shares_prefix(&self) -> bool {
        self.window.is_none()
    }

    /// Identity of the sealed block content, part of every block key: blocks of different
    /// formats (or with/without key bounds) never alias. `0` for [`Self::EXACT`]. The quest
    /// budget and the window are not part of it: the budget only changes reads, and windowed
    /// blocks are never keyed. `mhc`'s calibration id is mixed in by the engine
    /// (`KvClasses`), which knows the projection a model serves `mhc:R` with.
    pub fn content_id(&self) -> u32 {
        match self.codec {
            None => 0,
            Some(c) => {
                let h = blake3::hash(
                    format!("kv-content/{}/{}", c.name(), self.stores_bounds()).as_bytes(),
                );
                u32::from_le_bytes(h.as_bytes()[..4].try_into().expect("4 bytes")) | 1
            }
        }
    }

    /// Sealed bytes per token over all layers for KV heads of `head_dim` (block size `bs`).
    pub fn sealed_bytes_per_block(
        &self,
        layers: usize,
        kv_heads: usize,
        bs: usize,
        d: usize,
    ) -> Option<usize> {
        let c = self.codec?;
        let bounds = if self.stores_bounds() { 2 * d * 2 } else { 0 };
        // `mhc`: one bf16 latent of R (mean over layers) per token and layer, shared by the heads.
        let latent = c.latent_rank().map_or(0, |r| 2 * bs * r as usize);
        Some(layers * (latent + kv_heads * (c.k_bytes(bs, d) + c.v_bytes(bs, d) + bounds)))
    }
}

impl fmt::Display for KvPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.codec.map_or("exact".into(), |c| c.name()))?;
        if let Some(w) = self.window {
            write!(f, "+window:{w}")?;
        }
        if let Some(b) = self.quest {
            write!(f, "+quest:{b}")?;
        }
        Ok(())
    }
}
