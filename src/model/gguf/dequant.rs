//! ggml tensor types: their block layout (for bounds checks on any type) and dequantization to
//! f32 for the types we implement. Each block decoder repeats ggml's reference
//! `dequantize_row_*` arithmetic in f32, in the same order, so the results are bit-identical to
//! Python `gguf.quants.dequantize` (checked on random blocks of every implemented type).

use half::{bf16, f16};
use rayon::prelude::*;
use std::fmt;

/// A ggml tensor element type, named as in ggml (`GGML_TYPE_*`).
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// Every type with its ggml id, elements per block and bytes per block.
const TYPES: &[(GgmlType, u32, usize, usize)] = &[
    (GgmlType::F32, 0, 1, 4),
    (GgmlType::F16, 1, 1, 2),
    (GgmlType::Q4_0, 2, 32, 18),
    (GgmlType::Q4_1, 3, 32, 20),
    (GgmlType::Q5_0, 6, 32, 22),
    (GgmlType::Q5_1, 7, 32, 24),
    (GgmlType::Q8_0, 8, 32, 34),
    (GgmlType::Q8_1, 9, 32, 36),
    (GgmlType::Q2_K, 10, 256, 84),
    (GgmlType::Q3_K, 11, 256, 110),
    (GgmlType::Q4_K, 12, 256, 144),
    (GgmlType::Q5_K, 13, 256, 176),
    (GgmlType::Q6_K, 14, 256, 210),
    (GgmlType::Q8_K, 15, 256, 292),
    (GgmlType::IQ2_XXS, 16, 256, 66),
    (GgmlType::IQ2_XS, 17, 256, 74),
    (GgmlType::IQ3_XXS, 18, 256, 98),
    (GgmlType::IQ1_S, 19, 256, 50),
    (GgmlType::IQ4_NL, 20, 32, 18),
    (GgmlType::IQ3_S, 21, 256, 110),
    (GgmlType::IQ2_S, 22, 256, 82),
    (GgmlType::IQ4_XS, 23, 256, 136),
    (GgmlType::I8, 24, 1, 1),
    (GgmlType::I16, 25, 1, 2),
    (GgmlType::I32, 26, 1, 4),
    (GgmlType::I64, 27, 1, 8),
    (GgmlType::F64, 28, 1, 8),
    (GgmlType::IQ1_M, 29, 256, 56),
    (GgmlType::BF16, 30, 1, 2),
    (GgmlType::TQ1_0, 34, 256, 54),
    (GgmlType::TQ2_0, 35, 256, 66),
    (GgmlType::MXFP4, 39, 32, 17),
    (GgmlType::NVFP4, 40, 64, 36),
    (GgmlType::Q1_0, 41, 128, 18),
];

impl GgmlType {
    /// The type for a ggml type id, `None` for ids ggml does not define (or retired ones).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }

    fn entry(self) -> &'static (GgmlType, u32, usize, usize) {
        // Every variant is in TYPES (checked by a unit test), so the fallback is never taken.
        TYPES.iter().find(|t| t.0 == self).unwrap_or(&TYPES[0])
    }

    /// The ggml type id as stored in the file.
    pub fn id(self) -> u32 {
        self.entry().1
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        self.entry().2
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.entry().3
    }

    /// Whether [`dequantize`] implements this type.
    pub fn can_dequantize(self) -> bool {
        block_decoder(self).is_some()
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The Debug names are ggml's names.
        fmt::Debug::fmt(self, f)
    }
}

type BlockFn = fn(&[u8], &mut [f32]);

fn block_decoder(ty: GgmlType) -> Option<BlockFn> {
    Some(match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16_at(b, 0),
        GgmlType::BF16 => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::F64 => |b, y| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8]);
            y[0] = f64::from_le_bytes(a) as f32
        },
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q2_K => q2_k,
        GgmlType::Q3_K => q3_k,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        GgmlType::Q8_K => q8_k,
        GgmlType::IQ4_NL => iq4_nl,
        GgmlType::IQ4_XS => iq4_xs,
        _ => return None,
    })
}

/// Dequantizes `src` (whole blocks of `ty`) into `dst`, in parallel over chunks of blocks.
/// Errors (never panics) when the type is not implemented or the lengths do not match.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), String> {
    let decode =
        block_decoder(ty).ok_or_else(|| format!("dequantizing {ty} is not implemented"))?;
    let (bs, ts) = (ty.block_size(), ty.type_size());
    if !dst.len().is_multiple_of(bs) || src.len() != dst.len() / bs * ts {
        return Err(format!(
            "{ty}: {} bytes do not hold {} elements",
            src.len(),
            dst.len()
        ));
    }
    // About 16K elements per task: big enough to amortize rayon, small enough to balance.
    let blocks_per_task = (16384 / bs).max(1);
    dst.par_chunks_mut(bs * blocks_per_task)
        .zip(src.par_chunks(ts * blocks_per_task))
        .for_each(|(d, s)| {
            for (yb, xb) in d.chunks_exact_mut(bs).zip(s.chunks_exact(ts)) {
                decode(xb, yb);
            }
        });
    Ok(())
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0f) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh0 = ((qh >> j) << 4) & 0x10;
        let xh1 = (qh >> (j + 12)) & 0x10;
        let x0 = ((qs[j] as u32 & 0x0f) | xh0) as i32 - 16;
        let x1 = ((qs[j] as u32 >> 4) | xh1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh0 = ((qh >> j) << 4) & 0x10;
        let xh1 = (qh >> (j + 12)) & 0x10;
        let x0 = (qs[j] as u32 & 0x0f) | xh0;
        let x1 = (qs[j] as u32 >> 4) | xh1;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

fn q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for j in 0..256 {
        y[j] = d * b[4 + j] as i8 as f32;
    }
}

fn q2_k(b: &[u8], y: &mut [f32]) {
    // scales[16], qs[64], d, dmin
    let scales = &b[0..16];
    let d = f16_at(b, 80);
    let min = f16_at(b, 82);
    let mut out = 0;
    let mut is = 0;
    for n in 0..2 {
        let q = &b[16 + 32 * n..16 + 32 * n + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0f) as f32;
                let ml = min * (sc >> 4) as f32;
                for l in 0..16 {
                    let qv = (q[16 * half + l] >> shift) & 3;
                    y[out] = dl * qv as f32 - ml;
                    out += 1;
                }
            }
        }
    }
}

fn q3_k(b: &[u8], y: &mut [f32]) {
    // hmask[32], qs[64], scales[12], d
    let hm = &b[0..32];
    let d_all = f16_at(b, 108);
    let sb = &b[96..108];
    let w = |i: usize| u32::from_le_bytes([sb[4 * i], sb[4 * i + 1], sb[4 * i + 2], sb[4 * i + 3]]);
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let (a0, a1, tmp) = (w(0), w(1), w(2));
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut scales = [0i8; 16];
    for (i, a) in aux.iter().enumerate() {
        for (k, byte) in a.to_le_bytes().iter().enumerate() {
            scales[4 * i + k] = *byte as i8;
        }
    }
    let mut out = 0;
    let mut is = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &b[32 + 32 * n..32 + 32 * n + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in 0..16 {
                    let k = 16 * half + l;
                    let low = ((q[k] >> shift) & 3) as i32;
                    let high = if hm[k] & m != 0 { 0 } else { 4 };
                    y[out] = dl * (low - high) as f32;
                    out += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// The 6-bit scale and min of sub-block `j` from the 12 packed bytes of a Q4_K/Q5_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    // d, dmin, scales[12], qs[128]
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    for blk in 0..4 {
        let q = &b[16 + 32 * blk..16 + 32 * blk + 32];
        let (sc1, m1) = scale_min_k4(2 * blk, scales);
        let (sc2, m2) = scale_min_k4(2 * blk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let y = &mut y[64 * blk..64 * blk + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    // d, dmin, scales[12], qh[32], qs[128]
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    for blk in 0..4 {
        let ql = &b[48 + 32 * blk..48 + 32 * blk + 32];
        let (u1, u2) = (1u8 << (2 * blk), 2u8 << (2 * blk));
        let (sc1, m1) = scale_min_k4(2 * blk, scales);
        let (sc2, m2) = scale_min_k4(2 * blk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let y = &mut y[64 * blk..64 * blk + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((ql[l] & 0x0f) + h1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    // ql[128], qh[64], scales[16] (i8), d
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

fn iq4_nl(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * KVALUES_IQ4NL[(qs[j] & 0x0f) as usize] as f32;
        y[j + 16] = d * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
    }
}

fn iq4_xs(b: &[u8], y: &mut [f32]) {
    // d, scales_h (u16), scales_l[4], qs[128]
    let d = f16_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]) as i32;
    let scales_l = &b[4..8];
    for ib in 0..8 {
        let ls = ((scales_l[ib / 2] as i32 >> (4 * (ib % 2))) & 0x0f)
            | (((scales_h >> (2 * ib)) & 3) << 4);
        let dl = d * (ls - 32) as f32;
        let qs = &b[8 + 16 * ib..8 + 16 * ib + 16];
        let y = &mut y[32 * ib..32 * ib + 32];
        for j in 0..16 {
            y[j] = dl * KVALUES_IQ4NL[(qs[j] & 0x0f) as usize] as f32;
            y[j + 16] = dl * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn deq(ty: GgmlType, src: &[u8]) -> Vec<f32> {
        let n = src.len() / ty.type_size() * ty.block_size();
        let mut out = vec![f32::NAN; n];
        dequantize(ty, src, &mut out).unwrap();
        out
    }

    #[test]
    fn type_table_is_complete_and_consistent() {
        for &(ty, id, bs, ts) in TYPES {
            assert_eq!(GgmlType::from_id(id), Some(ty));
            assert_eq!((ty.id(), ty.block_size(), ty.type_size()), (id, bs, ts));
        }
        assert_eq!(GgmlType::from_id(4), None); // retired Q4_2
        assert_eq!(GgmlType::from_id(1000), None);
        assert!(!GgmlType::IQ2_XXS.can_dequantize());
    }

    #[test]
    fn plain_types() {
        let mut b = Vec::new();
        b.extend(1.5f32.to_le_bytes());
        b.extend((-2.25f32).to_le_bytes());
        assert_eq!(deq(GgmlType::F32, &b), [1.5, -2.25]);
        let b = [h(0.5), h(-3.0)].concat();
        assert_eq!(deq(GgmlType::F16, &b), [0.5, -3.0]);
        let b = [
            bf16::from_f32(7.0).to_le_bytes(),
            bf16::from_f32(-0.125).to_le_bytes(),
        ]
        .concat();
        assert_eq!(deq(GgmlType::BF16, &b), [7.0, -0.125]);
    }

    #[test]
    fn q4_0_block() {
        // d = 0.5; byte j holds low nibble j%16 (element j) and high nibble 15-j%16 (element j+16).
        let mut b = h(0.5).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = deq(GgmlType::Q4_0, &b);
        assert_eq!(y[0], -4.0); // (0 - 8) * 0.5
        assert_eq!(y[15], 3.5); // (15 - 8) * 0.5
        assert_eq!(y[16], 3.5); // (15 - 8) * 0.5
        assert_eq!(y[31], -4.0);
    }

    #[test]
    fn q4_1_block() {
        let mut b = [h(0.25), h(-1.0)].concat();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = deq(GgmlType::Q4_1, &b);
        assert_eq!(y[0], -1.0); // 0 * 0.25 - 1
        assert_eq!(y[5], 0.25); // 5 * 0.25 - 1
        assert_eq!(y[16], 2.75); // 15 * 0.25 - 1
    }

    #[test]
    fn q8_0_block() {
        let mut b = h(2.0).to_vec();
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let y = deq(GgmlType::Q8_0, &b);
        assert_eq!(y[0], -32.0);
        assert_eq!(y[16], 0.0);
        assert_eq!(y[31], 30.0);
    }

    #[test]
    fn q5_blocks() {
        // qh bit j is the 5th bit of element j; bit j+16 that of element j+16.
        let qh: u32 = 1 | (1 << 16);
        let mut b = h(1.0).to_vec();
        b.extend(qh.to_le_bytes());
        b.extend([0x21u8; 16]); // low nibble 1, high nibble 2
        let y = deq(GgmlType::Q5_0, &b);
        assert_eq!(y[0], (1 + 16 - 16) as f32);
        assert_eq!(y[1], (1 - 16) as f32);
        assert_eq!(y[16], (2 + 16 - 16) as f32);
        assert_eq!(y[17], (2 - 16) as f32);

        let mut b = [h(0.5), h(1.0)].concat();
        b.extend(qh.to_le_bytes());
        b.extend([0x21u8; 16]);
        let y = deq(GgmlType::Q5_1, &b);
        assert_eq!(y[0], 17.0 * 0.5 + 1.0);
        assert_eq!(y[1], 0.5 + 1.0);
        assert_eq!(y[16], 18.0 * 0.5 + 1.0);
    }

    #[test]
    fn q4_k_block() {
        // scales: sub-block 0 scale 2 min 1; sub-block 4 uses the packed high bits.
        let mut scales = [0u8; 12];
        scales[0] = 2; // sc0
        scales[4] = 1; // m0
        scales[8] = 0x53; // sc4 low 3, m4 low 5
        scales[0] |= 1 << 6; // sc4 high bits 01 -> sc4 = 3 | 16 = 19
        let mut b = [h(1.0), h(0.5)].concat();
        b.extend(scales);
        b.extend([0x37u8; 128]); // low nibble 7, high nibble 3
        let y = deq(GgmlType::Q4_K, &b);
        assert_eq!(y[0], 2.0 * 7.0 - 0.5 * 1.0);
        // Elements 128..160 are sub-block 4 (low nibbles of the third 32-byte group).
        assert_eq!(y[128], 19.0 * 7.0 - 0.5 * 5.0);
    }

    #[test]
    fn q6_k_block() {
        let mut b = vec![0u8; 210];
        b[0] = 0x05; // ql low nibble of element 0 = 5, high nibble (element 64) = 0
        b[128] = 0b10; // qh bits 0-1 of element 0 = 2 -> q = 5 | 32 = 37
        b[192] = 3; // scale of elements 0..16
        b[196] = (-2i8) as u8; // scale index 4: elements 64..80
        b[208..210].copy_from_slice(&h(0.5));
        let y = deq(GgmlType::Q6_K, &b);
        assert_eq!(y[0], 0.5 * 3.0 * (37 - 32) as f32);
        assert_eq!(y[64], 0.5 * -2.0 * -32.0);
    }

    #[test]
    fn length_mismatch_and_unsupported_are_errors() {
        let mut out = vec![0f32; 32];
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out).is_err());
        assert!(dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut vec![0f32; 256]).is_err());
    }
}
