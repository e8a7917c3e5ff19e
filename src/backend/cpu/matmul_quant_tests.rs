//! Tests of `matmul_quant.rs`: a quantized matrix multiplies to the very bits of an f32 matrix
//! of its dequantized values (ggml's reference decoders), in every kernel (in-register rows,
//! widened panels, scalar), at odd shapes and stacked parts; its rows widen exactly.

use super::super::{matmul_with, CpuMatrix, WData};
use crate::backend::cpu::simd;
use crate::model::tensor::{HostData, HostTensor, QuantData, QuantKind};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::borrow::Cow;

/// Random blocks of `kind` for a `[rows, cols]` matrix: scales of either sign over several
/// binades, every quant value reachable.
fn quant_tensor(
    kind: QuantKind,
    rows: usize,
    cols: usize,
    rng: &mut ChaCha8Rng,
) -> HostTensor<'static> {
    let mut blocks = Vec::new();
    for _ in 0..rows * cols / QuantKind::BLOCK {
        let scale = |rng: &mut ChaCha8Rng| {
            f16::from_f32(rng.random_range(-1.0f32..1.0) * 2f32.powi(rng.random_range(-9..2)))
        };
        blocks.extend(scale(rng).to_le_bytes());
        if kind == QuantKind::Q4_1 {
            blocks.extend(scale(rng).to_le_bytes());
            blocks.extend((0..16).map(|_| rng.random::<u8>()));
        } else {
            blocks.extend((0..32).map(|_| rng.random::<u8>()));
        }
    }
    HostTensor {
        name: format!("{}[{rows},{cols}]", kind.name()),
        shape: vec![rows, cols],
        data: HostData::Quant(QuantData {
            kind,
            blocks: Cow::Owned(blocks),
        }),
    }
}

fn as_f32(t: &HostTensor<'_>) -> HostTensor<'static> {
    HostTensor {
        name: t.name.clone(),
        shape: t.shape.clone(),
        data: HostData::F32(Cow::Owned(t.data.to_f32())),
    }
}

fn product(x: &[f32], m: usize, w: &CpuMatrix, simd: bool) -> Vec<u32> {
    let mut out = vec![f32::NAN; m * w.rows];
    matmul_with(x, m, w, &mut out, simd);
    out.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn quantized_products_are_the_bits_of_their_dequantized_f32_matrix() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let simd_too: &[bool] = if simd::avx2_fma() {
        &[false, true]
    } else {
        &[false]
    };
    for kind in [QuantKind::Q4_1, QuantKind::Q8_0] {
        // Parts stacked along rows (as q/k/v and gate/up are), groups of 16 and 32 features,
        // one to several blocks along K.
        for (parts, k) in [
            (&[16][..], 32),
            (&[48, 16][..], 96),
            (&[80, 40, 8][..], 64),
            (&[200][..], 576),
        ] {
            let q: Vec<_> = parts
                .iter()
                .map(|&r| quant_tensor(kind, r, k, &mut rng))
                .collect();
            let f: Vec<_> = q.iter().map(as_f32).collect();
            let wq = CpuMatrix::from_parts(&q.iter().collect::<Vec<_>>()).unwrap();
            let wf = CpuMatrix::from_parts(&f.iter().collect::<Vec<_>>()).unwrap();
            assert!(matches!(wq.data, WData::Quant(kk, _) if kk == kind));
            let n: usize = parts.iter().sum();
            assert_eq!(wq.bytes(), n * k / 32 * kind.block_bytes());
            for m in [1, 2, 3, 4, 5, 6, 8, 32, 33, 100] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let want = product(&x, m, &wf, false);
                for &simd in simd_too {
                    assert_eq!(
                        product(&x, m, &wq, simd),
                        want,
                        "{} {parts:?}×{k}, {m} rows, simd {simd}",
                        kind.name()
                    );
                }
            }
            // Rows widen to the dequantized values (embedding lookups).
            let all: Vec<f32> = f.iter().flat_map(|t| t.data.to_f32()).collect();
            let mut row = vec![0f32; k];
            for r in [0, n / 2, n - 1] {
                wq.row_f32(r, &mut row);
                assert_eq!(row, all[r * k..(r + 1) * k], "{} row {r}", kind.name());
            }
        }
    }
}

#[test]
fn quant_parts_of_mixed_formats_widen_to_bf16() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let a = quant_tensor(QuantKind::Q4_1, 16, 64, &mut rng);
    let b = quant_tensor(QuantKind::Q8_0, 16, 64, &mut rng);
    let m = CpuMatrix::from_parts(&[&a, &b]).unwrap();
    assert!(matches!(m.data, WData::Bf16(_)));
    let mut row = vec![0f32; 64];
    m.row_f32(20, &mut row);
    let want: Vec<f32> = b.data.to_bf16()[4 * 64..5 * 64]
        .iter()
        .map(|v| v.to_f32())
        .collect();
    assert_eq!(row, want);
}

#[test]
fn quantized_columns_must_be_whole_blocks() {
    // Rows of 48 columns in Q8_0 cannot come from a GGUF file (blocks run along rows), but a
    // hand-made tensor must be refused, not misread: its 3 blocks hold 96 = 2 × 48 elements.
    let t = HostTensor {
        name: "odd".into(),
        shape: vec![2, 48],
        data: HostData::Quant(QuantData {
            kind: QuantKind::Q8_0,
            blocks: Cow::Owned(vec![0; 3 * 34]),
        }),
    };
    let err = CpuMatrix::from_parts(&[&t]).unwrap_err().to_string();
    assert!(err.contains("not whole blocks"), "{err}");
    // Alone or stacked with a float part.
    let f = HostTensor {
        name: "f".into(),
        shape: vec![1, 48],
        data: HostData::F32(Cow::Owned(vec![0.0; 48])),
    };
    assert!(CpuMatrix::from_parts(&[&f, &t]).is_err());
}
