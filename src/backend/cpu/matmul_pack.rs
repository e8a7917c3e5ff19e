//! [`CpuMatrix`]: a weight matrix packed for the products in `matmul.rs` (layout: that module's
//! docs), built from a loader's tensors, plus the accessors that read it back (bytes, rows for
//! embedding lookups). The quantized formats pack in `matmul_quant.rs`.

use super::quant;
use super::{GROUP, SUB};
use crate::backend::cpu::arena::WeightBuf;
use crate::backend::cpu::simd::WElem;
use crate::error::BackendError;
use crate::model::tensor::{HostData, HostTensor, QuantKind};
use half::{bf16, f16};

/// Weight data in its stored format, packed as described in the module docs (the quantized
/// formats: `matmul_quant.rs`).
#[derive(Debug, Clone)]
pub enum WData {
    Bf16(WeightBuf<bf16>),
    F16(WeightBuf<f16>),
    F32(WeightBuf<f32>),
    Quant(QuantKind, WeightBuf<u8>),
}

/// A weight matrix `[rows = out_features, cols = in_features]`, packed.
#[derive(Debug, Clone)]
pub struct CpuMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: WData,
}

/// Index of `W[n, k]` in the packed data of a matrix with `rows` output features and `k_len`
/// input features.
#[inline]
pub(super) fn packed_index(rows: usize, k_len: usize, n: usize, k: usize) -> usize {
    let g = n / GROUP;
    let width = group_width(rows, g);
    g * GROUP * k_len + k * width + n % GROUP
}

/// Width (features, a multiple of 16) of group `g`.
#[inline]
pub(super) fn group_width(rows: usize, g: usize) -> usize {
    (rows.next_multiple_of(SUB) - g * GROUP).min(GROUP)
}

impl CpuMatrix {
    /// Stacks 2-D parts along rows. All parts of one dtype keep it (f32 stays f32). Mixed parts
    /// take the first part's dtype when that is bf16 or f16, else bf16 (a theoretical case:
    /// loaders hand out one dtype per checkpoint; f32 → bf16 rounds to nearest even).
    pub fn from_parts(parts: &[&HostTensor<'_>]) -> Result<Self, BackendError> {
        let first = parts
            .first()
            .ok_or_else(|| BackendError::Shape("upload_matrix: no parts".into()))?;
        let cols = *first.shape.get(1).unwrap_or(&0);
        let mut rows = 0;
        for p in parts {
            if p.shape.len() != 2 || p.shape[1] != cols || p.data.len() != p.numel() {
                return Err(BackendError::Shape(format!(
                    "upload_matrix: `{}` has shape {:?} ({} elements), expected [_, {cols}]",
                    p.name,
                    p.shape,
                    p.data.len()
                )));
            }
            rows += p.shape[0];
        }
        let same = |f: fn(&HostData<'_>) -> bool| parts.iter().all(|p| f(&p.data));
        let quant = parts.iter().any(|p| matches!(p.data, HostData::Quant(_)));
        if quant && !cols.is_multiple_of(QuantKind::BLOCK) {
            return Err(BackendError::Shape(format!(
                "upload_matrix: quantized rows of {cols} columns are not whole blocks of {}",
                QuantKind::BLOCK
            )));
        }
        if let HostData::Quant(q) = &first.data {
            let kind = q.kind;
            if parts
                .iter()
                .all(|p| matches!(&p.data, HostData::Quant(q) if q.kind == kind))
            {
                let data = quant::pack(parts, kind, rows, cols)?;
                return Ok(CpuMatrix {
                    rows,
                    cols,
                    data: WData::Quant(kind, data),
                });
            }
        }
        if quant {
            // Quantized parts of mixed kinds or stacked with float ones (no loader makes
            // these): widened and rounded to bf16, the format a checkpoint's floats take.
            let owned: Vec<HostTensor<'_>> = parts
                .iter()
                .map(|p| HostTensor {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    data: HostData::Bf16(p.data.to_bf16().into()),
                })
                .collect();
            return Self::from_parts(&owned.iter().collect::<Vec<_>>());
        }
        // Each part's rows are converted and scattered straight into their packed places in
        // the (huge-page, zeroed) destination; padding features stay zero.
        fn pack<T: Copy + Default>(
            parts: &[&HostTensor<'_>],
            rows: usize,
            cols: usize,
            conv: impl Fn(&HostData<'_>, std::ops::Range<usize>, &mut [T]),
        ) -> WeightBuf<T> {
            WeightBuf::build(rows.next_multiple_of(SUB) * cols, |dst| {
                let mut row = vec![T::default(); cols];
                let mut n = 0;
                for p in parts {
                    for r in 0..p.shape[0] {
                        conv(&p.data, r * cols..(r + 1) * cols, &mut row);
                        for (k, &v) in row.iter().enumerate() {
                            dst[packed_index(rows, cols, n, k)] = v;
                        }
                        n += 1;
                    }
                }
            })
        }
        let data = if same(|d| matches!(d, HostData::F32(_))) {
            WData::F32(pack(parts, rows, cols, |d, r, o| {
                if let HostData::F32(v) = d {
                    o.copy_from_slice(&v[r])
                }
            }))
        } else if matches!(first.data, HostData::F16(_)) {
            WData::F16(pack(parts, rows, cols, |d, r, o| {
                rows_as(d, r, o, f16::from_f32)
            }))
        } else {
            WData::Bf16(pack(parts, rows, cols, |d, r, o| {
                rows_as(d, r, o, bf16::from_f32)
            }))
        };
        Ok(CpuMatrix { rows, cols, data })
    }

    /// Bytes of weight data (what one decode step streams).
    pub fn bytes(&self) -> usize {
        match &self.data {
            WData::F32(_) => self.rows * self.cols * 4,
            WData::Quant(kind, _) => self.rows * self.cols / QuantKind::BLOCK * kind.block_bytes(),
            _ => self.rows * self.cols * 2,
        }
    }

    /// Widens row `r` (output feature `r`) into `out` (`cols` floats): a strided gather, used
    /// for embedding lookups.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        fn gather<T: WElem>(d: &[T], rows: usize, r: usize, out: &mut [f32]) {
            let cols = out.len();
            for (k, o) in out.iter_mut().enumerate() {
                *o = d[packed_index(rows, cols, r, k)].to_f32();
            }
        }
        let out = &mut out[..self.cols];
        match &self.data {
            WData::Bf16(d) => gather(d, self.rows, r, out),
            WData::F16(d) => gather(d, self.rows, r, out),
            WData::F32(d) => gather(d, self.rows, r, out),
            WData::Quant(kind, d) => quant::row_f32(*kind, d, self.rows, r, out),
        }
    }
}

/// Rows `r` of a float tensor into `o`, each value through f32 then `from_f32`. Widening f16 or
/// bf16 to f32 is exact, so a value already in `o`'s type comes back unchanged and any other
/// is rounded once.
fn rows_as<T>(d: &HostData, r: std::ops::Range<usize>, o: &mut [T], from_f32: fn(f32) -> T) {
    match d {
        HostData::F32(v) => o.iter_mut().zip(&v[r]).for_each(|(o, &x)| *o = from_f32(x)),
        HostData::F16(v) => o
            .iter_mut()
            .zip(&v[r])
            .for_each(|(o, x)| *o = from_f32(x.to_f32())),
        HostData::Bf16(v) => o
            .iter_mut()
            .zip(&v[r])
            .for_each(|(o, x)| *o = from_f32(x.to_f32())),
        HostData::Quant(_) => unreachable!("widened before packing"),
    }
}
