//! The GGUF byte layer: a bounds-checked little-endian reader over the mapped file, metadata
//! values and tensor-table entries. Every count and length is checked against the bytes left
//! in the file before anything is allocated from it.

use super::dequant::GgmlType;
use crate::error::ModelError;
use std::path::Path;

/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are rejected (bounds recursion on hostile input).
const MAX_ARRAY_DEPTH: u32 = 4;

/// A metadata array, stored typed so that memory stays proportional to the file size.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
}

impl GgufArray {
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::F64(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as i64 when this is an array of integers (any width).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        Some(match self {
            GgufArray::U8(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I8(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::U16(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I16(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::U32(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I32(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::U64(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I64(v) => v.clone(),
            _ => return None,
        })
    }

    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            GgufArray::String(v) => Some(v),
            _ => None,
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(GgufArray),
}

impl GgufValue {
    /// Any non-negative integer value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(x) => Some(x as u64),
            GgufValue::U16(x) => Some(x as u64),
            GgufValue::U32(x) => Some(x as u64),
            GgufValue::U64(x) => Some(x),
            GgufValue::I8(x) => u64::try_from(x).ok(),
            GgufValue::I16(x) => u64::try_from(x).ok(),
            GgufValue::I32(x) => u64::try_from(x).ok(),
            GgufValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// Any float value (f32 converted exactly to f64).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(x) => Some(x as f64),
            GgufValue::F64(x) => Some(x),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Bounds-checked little-endian reader over the mapped file.
pub(super) struct Reader<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
    pub(super) path: &'a Path,
}

impl<'a> Reader<'a> {
    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(super) fn err(&self, msg: String) -> ModelError {
        ModelError::format(self.path, msg)
    }

    pub(super) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ModelError> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated: {what} at offset {} needs {n} bytes but the file ends after {} more \
                 (file size {})",
                self.pos,
                self.remaining(),
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(super) fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ModelError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    pub(super) fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(super) fn u64(&mut self, what: &str) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items that each take at least `min_item_bytes` in the file: rejected when
    /// the rest of the file could not possibly hold them.
    pub(super) fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize, ModelError> {
        let at = self.pos;
        let n = self.u64(what)?;
        let max = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > max {
            return Err(self.err(format!(
                "{what} {n} at offset {at} is impossible: the remaining {} bytes hold at most {max}",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    pub(super) fn string(&mut self, what: &str) -> Result<String, ModelError> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(self.err(format!(
                "{what}: string length {len} at offset {at} exceeds the {} bytes left in the file",
                self.remaining()
            )));
        }
        let bytes = self.take(len as usize, what)?;
        // GGUF strings are UTF-8; a stray invalid byte is replaced rather than failing the load.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    pub(super) fn value(
        &mut self,
        ty: u32,
        key: &str,
        depth: u32,
    ) -> Result<GgufValue, ModelError> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(self.array::<1>(key)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => GgufValue::Bool(self.bool(key)?),
            8 => GgufValue::String(self.string(key)?),
            9 => GgufValue::Array(self.gguf_array(key, depth)?),
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(self.err(format!(
                    "metadata `{key}` has unknown value type {other} at offset {}",
                    self.pos - 4
                )))
            }
        })
    }

    pub(super) fn bool(&mut self, key: &str) -> Result<bool, ModelError> {
        match self.array::<1>(key)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(format!("metadata `{key}`: invalid bool byte {b}"))),
        }
    }

    pub(super) fn gguf_array(&mut self, key: &str, depth: u32) -> Result<GgufArray, ModelError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.err(format!("metadata `{key}`: arrays nested too deeply")));
        }
        let ty = self.u32(key)?;
        let min = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            other => {
                return Err(self.err(format!(
                    "metadata `{key}`: array of unknown value type {other}"
                )))
            }
        };
        let what = format!("metadata `{key}`: array length");
        let n = self.count(min, &what)?;
        macro_rules! fixed {
            ($variant:ident, $t:ty, $size:expr) => {{
                let bytes = self.take(n * $size, key)?;
                GgufArray::$variant(
                    bytes
                        .chunks_exact($size)
                        .map(|c| {
                            let mut a = [0u8; $size];
                            a.copy_from_slice(c);
                            <$t>::from_le_bytes(a)
                        })
                        .collect(),
                )
            }};
        }
        Ok(match ty {
            0 => GgufArray::U8(self.take(n, key)?.to_vec()),
            1 => GgufArray::I8(self.take(n, key)?.iter().map(|&b| b as i8).collect()),
            2 => fixed!(U16, u16, 2),
            3 => fixed!(I16, i16, 2),
            4 => fixed!(U32, u32, 4),
            5 => fixed!(I32, i32, 4),
            6 => fixed!(F32, f32, 4),
            10 => fixed!(U64, u64, 8),
            11 => fixed!(I64, i64, 8),
            12 => fixed!(F64, f64, 8),
            7 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool(key)?);
                }
                GgufArray::Bool(v)
            }
            8 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string(key)?);
                }
                GgufArray::String(v)
            }
            _ => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    match self.value(9, key, depth + 1)? {
                        GgufValue::Array(a) => v.push(a),
                        _ => unreachable!("value type 9 always yields an array"),
                    }
                }
                GgufArray::Array(v)
            }
        })
    }
}

pub(super) type RawTensor = (String, Vec<u64>, GgmlType, u64, u64);

pub(super) fn read_tensor_info(r: &mut Reader<'_>) -> Result<RawTensor, ModelError> {
    let name = r.string("tensor name")?;
    let n_dims = r.u32("tensor dimension count")?;
    if n_dims > MAX_DIMS {
        return Err(r.err(format!(
            "tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS} allowed)"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(r.u64("tensor dimension")?);
    }
    let type_id = r.u32("tensor type")?;
    let offset = r.u64("tensor data offset")?;
    let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
        ModelError::unsupported(
            r.path,
            format!("tensor `{name}` has unknown ggml type id {type_id}"),
        )
    })?;
    // Element and byte counts with overflow checks: a hostile file can claim dims whose product
    // overflows; the byte count is then checked against the file size by the caller.
    let mut numel: u64 = 1;
    for &d in &dims {
        numel = numel
            .checked_mul(d)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| r.err(format!("tensor `{name}`: dimensions {dims:?} overflow")))?;
    }
    let bs = ggml_type.block_size() as u64;
    if !numel.is_multiple_of(bs) || dims.first().is_some_and(|&d0| !d0.is_multiple_of(bs)) {
        return Err(r.err(format!(
            "tensor `{name}`: row length in {dims:?} is not a multiple of the {ggml_type} block \
             size {bs}"
        )));
    }
    let n_bytes = (numel / bs)
        .checked_mul(ggml_type.type_size() as u64)
        .ok_or_else(|| r.err(format!("tensor `{name}`: byte size overflows")))?;
    Ok((name, dims, ggml_type, n_bytes, offset))
}
