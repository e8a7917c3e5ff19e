//! Host-side tensors as the loaders hand them over: a name, a shape (row-major, outermost first,
//! the Hugging Face orientation) and data in one of the float formats a backend can take.

use half::{bf16, f16};
use std::borrow::Cow;

/// Element data of a host tensor. Borrowed when it can point straight into an mmap,
/// owned when it had to be converted (GGUF dequantization, unaligned safetensors data).
#[derive(Debug, Clone)]
pub enum HostData<'a> {
    F32(Cow<'a, [f32]>),
    Bf16(Cow<'a, [bf16]>),
    F16(Cow<'a, [f16]>),
}

impl HostData<'_> {
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(d) => d.len(),
            HostData::Bf16(d) => d.len(),
            HostData::F16(d) => d.len(),
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
        }
    }

    /// Converts to bf16 with round-to-nearest-even (the rounding torch and numpy use).
    pub fn to_bf16(&self) -> Vec<bf16> {
        match self {
            HostData::F32(d) => d.iter().map(|&x| bf16::from_f32(x)).collect(),
            HostData::Bf16(d) => d.to_vec(),
            HostData::F16(d) => d.iter().map(|x| bf16::from_f32(x.to_f32())).collect(),
        }
    }

    pub fn dtype_name(&self) -> &'static str {
        match self {
            HostData::F32(_) => "F32",
            HostData::Bf16(_) => "BF16",
            HostData::F16(_) => "F16",
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
