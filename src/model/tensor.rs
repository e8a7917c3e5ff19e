//! Host-side tensors as the loaders hand them over: a name, a shape (row-major, outermost first,
//! the Hugging Face orientation) and data in one of the float formats a backend can take, or in a ggml block format
//! that a backend multiplies with as stored.

use super::gguf::{dequantize, GgmlType};
use half::{bf16, f16};
use std::borrow::Cow;

/// Element data of a host tensor. Borrowed when it can point straight into an mmap,
/// owned when it had to be converted (GGUF dequantization, unaligned safetensors data).
#[derive(Debug, Clone)]
pub enum HostData<'a> {
    F32(Cow<'a, [f32]>),
    Bf16(Cow<'a, [bf16]>),
    F16(Cow<'a, [f16]>),
    /// Blocks of a ggml quantized type, kept as stored: rows of `cols / 32` blocks.
    Quant(QuantData<'a>),
}

/// The ggml block formats a backend can multiply with directly (llama.cpp's layouts: 32
/// weights along a row per block). Dequantized, each weight is an exact f32: the f16 scale times
/// a 4- or 8-bit integer needs at most 19 significant bits, so `d·q (+ m)` rounds once.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// `{ f16 d; f16 m; u8 qs[16] }`: `w = d·q + m`, `q` in 0..16; element `j` is the low nibble
    /// of `qs[j]`, element `j + 16` the high nibble.
    Q4_1,
    /// `{ f16 d; i8 qs[32] }`: `w = d·q`.
    Q8_0,
}

impl QuantKind {
    /// Weights per block.
    pub const BLOCK: usize = 32;

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_1 => 20,
            QuantKind::Q8_0 => 34,
        }
    }

    pub fn ggml_type(self) -> GgmlType {
        match self {
            QuantKind::Q4_1 => GgmlType::Q4_1,
            QuantKind::Q8_0 => GgmlType::Q8_0,
        }
    }

    pub fn from_ggml(t: GgmlType) -> Option<QuantKind> {
        match t {
            GgmlType::Q4_1 => Some(QuantKind::Q4_1),
            GgmlType::Q8_0 => Some(QuantKind::Q8_0),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q4_1 => "Q4_1",
            QuantKind::Q8_0 => "Q8_0",
        }
    }
}

/// Quantized blocks, row after row, as a GGUF file stores them.
#[derive(Debug, Clone)]
pub struct QuantData<'a> {
    pub kind: QuantKind,
    pub blocks: Cow<'a, [u8]>,
}

impl QuantData<'_> {
    /// Elements held.
    pub fn len(&self) -> usize {
        self.blocks.len() / self.kind.block_bytes() * QuantKind::BLOCK
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The exact f32 values (ggml's reference dequantization).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        let whole = &self.blocks[..self.len() / QuantKind::BLOCK * self.kind.block_bytes()];
        dequantize(self.kind.ggml_type(), whole, &mut out).expect("whole blocks always dequantize");
        out
    }
}

impl HostData<'_> {
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(d) => d.len(),
            HostData::Bf16(d) => d.len(),
            HostData::F16(d) => d.len(),
            HostData::Quant(q) => q.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Converts to f32 (exact for every variant).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostData::F32(d) => d.to_vec(),
            HostData::Bf16(d) => d.iter().map(|x| x.to_f32()).collect(),
            HostData::F16(d) => d.iter().map(|x| x.to_f32()).collect(),
            HostData::Quant(q) => q.to_f32(),
        }
    }

    /// Converts to bf16 with round-to-nearest-even (the rounding torch and numpy use).
    pub fn to_bf16(&self) -> Vec<bf16> {
        match self {
            HostData::F32(d) => d.iter().map(|&x| bf16::from_f32(x)).collect(),
            HostData::Bf16(d) => d.to_vec(),
            HostData::F16(d) => d.iter().map(|x| bf16::from_f32(x.to_f32())).collect(),
            HostData::Quant(q) => q.to_f32().into_iter().map(bf16::from_f32).collect(),
        }
    }

    pub fn dtype_name(&self) -> &'static str {
        match self {
            HostData::F32(_) => "F32",
            HostData::Bf16(_) => "BF16",
            HostData::F16(_) => "F16",
            HostData::Quant(q) => q.kind.name(),
        }
    }
}

/// One named tensor, shape in Hugging Face orientation (`[out_features, in_features]` for a
/// linear weight).
#[derive(Debug, Clone)]
pub struct HostTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: HostData<'a>,
}

impl HostTensor<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}
