//! The projection file of `mhc:R`: safetensors, written byte for byte the same for the same
//! model, text and options.
//!
//! Tensors (f32): `layers.{l}.mean` `[W]`, `layers.{l}.down` `[r_l, W]`, `layers.{l}.up_t`
//! `[r_l, W]` (see `backend::latent`). Metadata: one entry, `kvserve`, holding the JSON of
//! [`CalibrationInfo`] (one key, so the header's bytes do not depend on a hash map's order):
//! format version, the model's fingerprint (BLAKE3 of its config and weight files) and name,
//! the calibration text's name and SHA-256, ranks and how they were chosen.
//!
//! The calibration id that goes into every `mhc` block key is the BLAKE3 of the whole file.

use super::Calibrated;
use crate::backend::latent::{LatentKeys, LatentLayer};
use crate::backend::RopeParams;
use crate::error::ModelError;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The format tag of this file layout.
pub const FORMAT: &str = "kvserve-mhc-keys/1";

/// What a projection file says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationInfo {
    pub format: String,
    /// [`model_fingerprint`] of the model it was computed on.
    pub model: String,
    pub model_name: String,
    /// The calibration text's file name and SHA-256 (hex).
    pub text: String,
    pub text_sha256: String,
    /// Tokens the statistics were gathered on.
    pub tokens: usize,
    /// The R of `mhc:R` (mean rank over layers).
    pub rank: u16,
    pub ranks: Vec<usize>,
    /// `uniform` or `energy`.
    pub allocation: String,
    /// How keys are weighted: always `query-energy` (§5.6.2 of the research note).
    pub weighting: String,
    /// Per layer, the share of the query-weighted key variance the kept components carry.
    pub retained: Vec<f64>,
}

/// A loaded projection file.
#[derive(Debug, Clone)]
pub struct CalibrationFile {
    pub info: CalibrationInfo,
    /// The projection, `id` set; its `rope` is filled in by the model it is attached to.
    pub keys: LatentKeys,
}

/// An identity of a model's content: BLAKE3 over its `config.json` and weight files
/// (`*.safetensors` in a directory, or the `.gguf` file), in name order. Hashing ~270 MB takes
/// a fraction of a second; it runs only when a projection is made or loaded.
pub fn model_fingerprint(path: &Path) -> Result<String, ModelError> {
    let mut files = Vec::new();
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| ModelError::io(path, e))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "config.json" || name.ends_with(".safetensors") {
                files.push(e.path());
            }
        }
    } else {
        files.push(path.to_path_buf());
    }
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Format {
            path: path.into(),
            msg: "no config.json or weight files to fingerprint".into(),
        });
    }
    let mut h = blake3::Hasher::new();
    for f in &files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        h.update(name.unwrap_or_default().as_bytes());
        let file = std::fs::File::open(f).map_err(|e| ModelError::io(f, e))?;
        // SAFETY: read-only map of a file we do not modify; a concurrent writer could change
        // the bytes under us, which at worst gives a wrong fingerprint (a refused file).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(f, e))?;
        h.update(&(map.len() as u64).to_le_bytes());
        h.update(&map);
    }
    Ok(format!("blake3:{}", h.finalize().to_hex()))
}

/// Serializes a calibration. `model`: the fingerprint; `text`: the text's name and SHA-256.
pub fn to_bytes(
    cal: &Calibrated,
    model: &str,
    model_name: &str,
    (text, text_sha256): (&str, &str),
) -> Result<Vec<u8>, String> {
    let k = &cal.keys;
    let info = CalibrationInfo {
        format: FORMAT.into(),
        model: model.into(),
        model_name: model_name.into(),
        text: text.into(),
        text_sha256: text_sha256.into(),
        tokens: cal.tokens,
        rank: k.rank,
        ranks: k.layers.iter().map(|l| l.rank).collect(),
        allocation: cal.allocation.name().into(),
        weighting: "query-energy".into(),
        retained: cal.retained.clone(),
    };
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (l, layer) in k.layers.iter().enumerate() {
        let (r, w) = (layer.rank, k.kv_width);
        data.push((format!("layers.{l}.mean"), vec![w], bytes(&layer.mean)));
        data.push((format!("layers.{l}.down"), vec![r, w], bytes(&layer.down)));
        data.push((format!("layers.{l}.up_t"), vec![r, w], bytes(&layer.up_t)));
    }
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, shape, b)| {
            TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let meta = serde_json::to_string(&info).map_err(|e| e.to_string())?;
    safetensors::serialize(views, Some(HashMap::from([("kvserve".to_string(), meta)])))
        .map_err(|e| e.to_string())
}

/// Reads a projection file and checks it belongs to the model with fingerprint `model` (for
/// every other problem — not safetensors, not ours, missing or misshapen tensors — a
/// [`ModelError::Format`] naming the file).
pub fn load(path: &Path, model: &str) -> Result<CalibrationFile, ModelError> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let file = parse(&bytes).map_err(|msg| ModelError::Format {
        path: path.into(),
        msg,
    })?;
    if file.info.model != model {
        return Err(ModelError::Calibration(format!(
            "{} was made for another model ({} {}), not the loaded one ({model}); run `kvserve \
             calibrate` for this model",
            path.display(),
            file.info.model_name,
            file.info.model
        )));
    }
    Ok(file)
}

/// Parses the bytes of a projection file (no model check).
pub fn parse(bytes: &[u8]) -> Result<CalibrationFile, String> {
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| format!("not a safetensors file ({e})"))?;
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file ({e})"))?;
    let meta = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("kvserve"))
        .ok_or("not a kvserve calibration (no `kvserve` metadata)")?;
    let info: CalibrationInfo =
        serde_json::from_str(meta).map_err(|e| format!("bad calibration metadata: {e}"))?;
    if info.format != FORMAT {
        return Err(format!(
            "calibration format `{}`, this build reads `{FORMAT}`",
            info.format
        ));
    }
    let tensor = |name: String, shape: &[usize]| -> Result<Vec<f32>, String> {
        let t = st
            .tensor(&name)
            .map_err(|_| format!("missing tensor `{name}`"))?;
        if t.dtype() != Dtype::F32 || t.shape() != shape {
            return Err(format!(
                "tensor `{name}` is {:?} {:?}, expected F32 {shape:?}",
                t.dtype(),
                t.shape()
            ));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    let w = st
        .tensor("layers.0.mean")
        .map_err(|_| "missing tensor `layers.0.mean`".to_string())?
        .shape()
        .first()
        .copied()
        .unwrap_or(0);
    let mut layers = Vec::with_capacity(info.ranks.len());
    for (l, &r) in info.ranks.iter().enumerate() {
        layers.push(LatentLayer {
            rank: r,
            mean: tensor(format!("layers.{l}.mean"), &[w])?,
            down: tensor(format!("layers.{l}.down"), &[r, w])?,
            up_t: tensor(format!("layers.{l}.up_t"), &[r, w])?,
        });
    }
    if st.len() != 3 * layers.len() {
        return Err(format!(
            "{} tensors for {} layers (expected 3 per layer)",
            st.len(),
            layers.len()
        ));
    }
    // The head size is not in the file: any divisor works for validation here; the model
    // checks its own when the projection is attached.
    let keys = LatentKeys {
        id: *blake3::hash(bytes).as_bytes(),
        rank: info.rank,
        kv_width: w,
        head_dim: w,
        layers,
        rope: RopeParams {
            inv_freq: Vec::new(),
            attention_scaling: 1.0,
        },
        max_positions: 0,
    };
    keys.validate()?;
    Ok(CalibrationFile { info, keys })
}

impl CalibrationFile {
    /// The projection for a model whose KV heads are `head_dim` wide.
    pub fn into_keys(mut self, head_dim: usize) -> LatentKeys {
        self.keys.head_dim = head_dim;
        self.keys
    }
}
