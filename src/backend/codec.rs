//! How a sealed KV block is stored: the byte formats of one layer's, one KV head's run of `bs`
//! keys or values (`bs × d` f32, token-major) once the block is full.
//!
//! Attention decodes rows of a run on the fly, inside its inner loop, into a small f32 tile, so
//! decoding is plain loops the compiler vectorizes, with no allocation, and it is exact: decode
//! computes precisely the values the encoder assumed (the encoder quantizes against the scale and
//! zero *after* their rounding to f16, i.e. what decode will read).
//!
//! Why these formats:
//! - **Keys are quantized per channel** (over the block's tokens, KIVI's key scheme): key
//!   activations have a few outlier channels whose magnitude is many times the rest, and they are
//!   outliers for every token. A per-token group that contains such a channel gets a scale sized
//!   for the outlier, and every other channel of the token collapses to one or two levels; a
//!   per-channel group only spans that channel's own range.
//! - **Values are quantized per token** (in groups of 32 channels): values have no consistent
//!   outlier channels, and attention mixes values per token (an output is a weighted sum of value
//!   rows), so the per-token error is what bounds the output error.
//! - **Scales and zeros are f16**: half the bytes of f32 for the metadata, which is a large share
//!   of a 16-token block at 2–4 bits, and far more range and precision than a quantizer with 4 to
//!   255 levels needs. Scales are rounded *up* to f16 and asymmetric zeros *down*, so the f16 grid
//!   always covers the group's `[min, max]`, and the error stays within half a (stored) step.
//!
//! Bytes per element pair (one key plus one value) relative to bf16, at `bs = 16, d = 64`:
//! `bf16` 1.0, `int8` 0.516, `kivi4` 0.344, `kivi2` 0.219, `k8v4` 0.414.
//!
//! Formats (all multi-byte fields little-endian):
//! - `bf16`: `bs·d` bf16, round to nearest even.
//! - int8 (keys and values of `int8`, keys of `k8v4`): per token symmetric,
//!   `scale = max|x| / 127`, `code = clamp(round(x / scale), -127, 127)`; `bs·d` i8 codes, then
//!   `bs` f16 scales. `x = code · scale`.
//! - per-token b-bit (values of `kivi4`, `kivi2`, `k8v4`): per (token, group of `g` channels),
//!   `g = 32` if `d % 32 == 0` else `d`; `zero = min`, `scale = (max − min) / (2^b − 1)`,
//!   `code = clamp(round((x − zero) / scale), 0, 2^b − 1)`; codes packed token-major (flat element
//!   `e = t·d + c` lives in byte `e·b / 8` at bit `(e mod 8/b)·b`: low nibble first at 4 bits),
//!   then per (token, group) the f16 scale and f16 zero, interleaved. `x = zero + code · scale`.
//! - per-channel b-bit (keys of `kivi4`, `kivi2`): as above with one group per channel over the
//!   block's `bs` tokens; codes packed the same way, then `d` f16 scales, then `d` f16 zeros.
//!
//! Rounding of codes is `f32::round` (half away from zero). A scale of 0 (constant or all-zero
//! group) gives code 0, so such groups decode exactly when their value is an f16. Non-finite input
//! never panics: NaN is ignored for the ranges and encodes as code 0; ±inf and magnitudes beyond
//! f16 clamp the scale/zero to ±[`f16::MAX`] and the codes to their range (`bf16` keeps NaN and
//! ±inf as they are, like the unquantized cache).

use half::{bf16, f16};

/// Storage format of a sealed block's K and V runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Codec {
    /// `mhc:R`: keys as one joint low-rank latent per (block, layer) across all KV heads, of
    /// rank R on average over layers (bf16 latents; the calibrated projection is
    /// [`super::latent::LatentKeys`]); values per head in `values`' format. A layer's K runs
    /// are empty (`k_bytes` is 0): the store keeps the latent beside the V runs.
    Mhc { rank: u16, values: MhcValues },
    /// K and V as bf16.
    Bf16,
    /// K and V as per-token symmetric int8.
    Int8,
    /// K per-channel 4-bit over the block, V per-token 4-bit in groups of 32 (KIVI).
    Kivi4,
    /// K per-channel 2-bit over the block, V per-token 2-bit in groups of 32 (KIVI).
    Kivi2,
    /// K as `Int8`, V per-token 4-bit in groups of 32.
    K8v4,
}

/// The value format of `mhc:R` (values are not low-rank: they are quantized instead, research
/// note §4 — a projection error is the same for every token and attention cannot average it
/// out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MhcValues {
    Bf16,
    /// Per-token int8, as [`Codec::Int8`]'s values.
    Int8,
    /// Per-token 4-bit in groups of 32, as [`Codec::Kivi4`]'s values.
    Kivi4,
}

impl MhcValues {
    pub const ALL: [MhcValues; 3] = [MhcValues::Bf16, MhcValues::Int8, MhcValues::Kivi4];

    /// The format's name in a policy (`mhc:64+kivi4`).
    pub fn name(self) -> &'static str {
        match self {
            MhcValues::Bf16 => "bf16",
            MhcValues::Int8 => "int8",
            MhcValues::Kivi4 => "kivi4",
        }
    }
}

/// One run's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// No per-head run (the keys of `mhc`, stored as the layer's latent).
    None,
    Bf16,
    Int8,
    /// Per (token, group of channels) asymmetric, this many bits.
    Tok(u32),
    /// Per channel over the block asymmetric, this many bits.
    Chan(u32),
}

impl Codec {
    /// Every codec that needs no calibration, in declaration order.
    pub const PLAIN: [Codec; 5] = [
        Codec::Bf16,
        Codec::Int8,
        Codec::Kivi4,
        Codec::Kivi2,
        Codec::K8v4,
    ];

    /// The policy name: `"bf16"`, `"int8"`, `"kivi4"`, `"kivi2"`, `"k8v4"` or
    /// `"mhc:R+<values>"`.
    pub fn name(self) -> String {
        match self {
            Codec::Bf16 => "bf16".into(),
            Codec::Int8 => "int8".into(),
            Codec::Kivi4 => "kivi4".into(),
            Codec::Kivi2 => "kivi2".into(),
            Codec::K8v4 => "k8v4".into(),
            Codec::Mhc { rank, values } => format!("mhc:{rank}+{}", values.name()),
        }
    }

    /// The plain codec of a policy name (the inverse of [`Codec::name`] on [`Codec::PLAIN`]).
    pub fn from_name(name: &str) -> Option<Codec> {
        Codec::PLAIN.into_iter().find(|c| c.name() == name)
    }

    /// The latent rank budget of `mhc:R` (`None` for per-head formats).
    pub fn latent_rank(self) -> Option<u16> {
        match self {
            Codec::Mhc { rank, .. } => Some(rank),
            _ => None,
        }
    }

    fn k_run(self) -> Run {
        match self {
            Codec::Bf16 => Run::Bf16,
            Codec::Int8 | Codec::K8v4 => Run::Int8,
            Codec::Kivi4 => Run::Chan(4),
            Codec::Kivi2 => Run::Chan(2),
            Codec::Mhc { .. } => Run::None,
        }
    }

    fn v_run(self) -> Run {
        match self {
            Codec::Bf16
            | Codec::Mhc {
                values: MhcValues::Bf16,
                ..
            } => Run::Bf16,
            Codec::Int8
            | Codec::Mhc {
                values: MhcValues::Int8,
                ..
            } => Run::Int8,
            Codec::Kivi4
            | Codec::K8v4
            | Codec::Mhc {
                values: MhcValues::Kivi4,
                ..
            } => Run::Tok(4),
            Codec::Kivi2 => Run::Tok(2),
        }
    }

    /// Bytes of one encoded K run of `bs` tokens × `d` channels (`d` even).
    pub fn k_bytes(self, bs: usize, d: usize) -> usize {
        self.k_run().bytes(bs, d)
    }

    /// Bytes of one encoded V run of `bs` tokens × `d` channels (`d` even).
    pub fn v_bytes(self, bs: usize, d: usize) -> usize {
        self.v_run().bytes(bs, d)
    }

    /// Encoded K+V bytes relative to bf16 K+V (`(k_bytes + v_bytes) / (4·bs·d)`): bf16 1.0,
    /// int8 0.516, kivi4 0.344, kivi2 0.219, k8v4 0.414 at `bs = 16, d = 64` (`mhc`'s latent
    /// not included).
    pub fn bytes_per_token_ratio(self, bs: usize, d: usize) -> f64 {
        (self.k_bytes(bs, d) + self.v_bytes(bs, d)) as f64 / (4 * bs * d) as f64
    }

    /// Encodes `src` (`bs * d` f32, token-major) into `dst` (exactly `k_bytes` long).
    pub fn encode_k(self, src: &[f32], bs: usize, d: usize, dst: &mut [u8]) {
        self.k_run().encode(src, bs, d, dst)
    }

    /// Encodes `src` (`bs * d` f32, token-major) into `dst` (exactly `v_bytes` long).
    pub fn encode_v(self, src: &[f32], bs: usize, d: usize, dst: &mut [u8]) {
        self.v_run().encode(src, bs, d, dst)
    }

    /// Decodes tokens `r0..r1` of an encoded K run into `out` (`(r1 - r0) * d` f32, token-major).
    pub fn decode_k(self, src: &[u8], bs: usize, d: usize, r0: usize, r1: usize, out: &mut [f32]) {
        self.k_run().decode(src, bs, d, r0, r1, out)
    }

    /// Decodes tokens `r0..r1` of an encoded V run into `out` (`(r1 - r0) * d` f32, token-major).
    pub fn decode_v(self, src: &[u8], bs: usize, d: usize, r0: usize, r1: usize, out: &mut [f32]) {
        self.v_run().decode(src, bs, d, r0, r1, out)
    }
}

/// Channels per group of the per-token formats.
fn group_size(d: usize) -> usize {
    if d.is_multiple_of(32) {
        32
    } else {
        d
    }
}

/// Bytes of `n` packed `bits`-bit codes.
fn packed_len(bits: u32, n: usize) -> usize {
    (n * bits as usize).div_ceil(8)
}

impl Run {
    fn bytes(self, bs: usize, d: usize) -> usize {
        debug_assert!(d.is_multiple_of(2) && d > 0, "head_dim must be even");
        match self {
            Run::None => 0,
            Run::Bf16 => 2 * bs * d,
            Run::Int8 => bs * d + 2 * bs,
            Run::Tok(b) => packed_len(b, bs * d) + 4 * bs * (d / group_size(d)),
            Run::Chan(b) => packed_len(b, bs * d) + 4 * d,
        }
    }

    fn encode(self, src: &[f32], bs: usize, d: usize, dst: &mut [u8]) {
        assert_eq!(src.len(), bs * d, "encode: src is not bs * d");
        assert_eq!(
            dst.len(),
            self.bytes(bs, d),
            "encode: dst has the wrong size"
        );
        match self {
            Run::None => {}
            Run::Bf16 => {
                for (o, &x) in dst.chunks_exact_mut(2).zip(src) {
                    o.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
                }
            }
            Run::Int8 => encode_int8(src, bs, d, dst),
            Run::Tok(b) => encode_tok(b, src, bs, d, dst),
            Run::Chan(b) => encode_chan(b, src, bs, d, dst),
        }
    }

    fn decode(self, src: &[u8], bs: usize, d: usize, r0: usize, r1: usize, out: &mut [f32]) {
        assert!(
            r0 <= r1 && r1 <= bs,
            "decode: rows {r0}..{r1} outside 0..{bs}"
        );
        assert_eq!(out.len(), (r1 - r0) * d, "decode: out is not (r1 - r0) * d");
        debug_assert_eq!(
            src.len(),
            self.bytes(bs, d),
            "decode: src has the wrong size"
        );
        match self {
            Run::None => debug_assert!(false, "decode of a latent key run"),
            Run::Bf16 => {
                let bytes = &src[2 * r0 * d..2 * r1 * d];
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                }
            }
            Run::Int8 => decode_int8(src, bs, d, r0, r1, out),
            Run::Tok(2) => decode_tok::<2>(src, bs, d, r0, r1, out),
            Run::Tok(4) => decode_tok::<4>(src, bs, d, r0, r1, out),
            Run::Chan(2) => decode_chan::<2>(src, bs, d, r0, r1, out),
            Run::Chan(4) => decode_chan::<4>(src, bs, d, r0, r1, out),
            Run::Tok(_) | Run::Chan(_) => unreachable!("only 2- and 4-bit runs exist"),
        }
    }
}

// ---- f16 parameters ----

const F16_MAX: f32 = 65504.0;

/// The least f16 ≥ `x`, clamped to ±[`f16::MAX`] (NaN → 0).
fn f16_up(x: f32) -> f16 {
    if x.is_nan() {
        return f16::ZERO;
    }
    if x >= F16_MAX {
        return f16::MAX;
    }
    if x <= -F16_MAX {
        return f16::MIN;
    }
    let h = f16::from_f32(x);
    if h.to_f32() >= x {
        return h;
    }
    // h < x < f16::MAX, so the next f16 up is finite.
    let b = h.to_bits();
    f16::from_bits(match b {
        0x8000 => 0x0001,
        _ if b & 0x8000 != 0 => b - 1,
        _ => b + 1,
    })
}

/// The greatest f16 ≤ `x`, clamped to ±[`f16::MAX`] (NaN → 0).
fn f16_down(x: f32) -> f16 {
    -f16_up(-x)
}

#[inline(always)]
fn rd_f16(buf: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([buf[off], buf[off + 1]]).to_f32()
}

#[inline(always)]
fn wr_f16(buf: &mut [u8], off: usize, h: f16) {
    buf[off..off + 2].copy_from_slice(&h.to_le_bytes());
}

/// `(min, max)` of the non-NaN values, `(0, 0)` if there are none.
fn min_max(xs: impl Iterator<Item = f32>) -> (f32, f32) {
    let (lo, hi) = xs.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    if lo > hi {
        (0.0, 0.0)
    } else {
        (lo, hi)
    }
}

/// The f16 `(scale, zero)` of an asymmetric group with `levels + 1` levels over `[lo, hi]`:
/// zero rounded down, scale rounded up, so `[zero, zero + levels·scale] ⊇ [lo, hi]` (within
/// f16's range).
fn affine_params(lo: f32, hi: f32, levels: f32) -> (f16, f16) {
    let zero = f16_down(lo);
    let range = hi - zero.to_f32();
    let scale = if range > 0.0 {
        f16_up(range / levels)
    } else {
        f16::ZERO
    };
    (scale, zero)
}

/// The code of `x` against the (f16-rounded) `scale` and `zero`.
#[inline(always)]
fn affine_code(x: f32, scale: f32, zero: f32, levels: f32) -> u8 {
    if scale == 0.0 {
        return 0;
    }
    // NaN survives `clamp` and casts to 0.
    ((x - zero) / scale).round().clamp(0.0, levels) as u8
}

/// ORs `q` into flat element `e` of a zeroed code array.
#[inline(always)]
fn put_code(codes: &mut [u8], bits: u32, e: usize, q: u8) {
    let per = 8 / bits as usize;
    codes[e / per] |= q << ((e % per) as u32 * bits);
}

#[inline(always)]
fn get_code<const BITS: usize>(codes: &[u8], e: usize) -> u8 {
    let per = 8 / BITS;
    (codes[e / per] >> ((e % per) * BITS)) & ((1u8 << BITS) - 1)
}

// ---- int8 ----

fn encode_int8(src: &[f32], bs: usize, d: usize, dst: &mut [u8]) {
    let (codes, scales) = dst.split_at_mut(bs * d);
    for t in 0..bs {
        let row = &src[t * d..(t + 1) * d];
        // f32::max ignores NaN.
        let amax = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let scale = f16_up(amax / 127.0);
        wr_f16(scales, 2 * t, scale);
        let s = scale.to_f32();
        for (o, &x) in codes[t * d..(t + 1) * d].iter_mut().zip(row) {
            let q = if s == 0.0 {
                0
            } else {
                (x / s).round().clamp(-127.0, 127.0) as i8
            };
            *o = q as u8;
        }
    }
}

fn decode_int8(src: &[u8], bs: usize, d: usize, r0: usize, r1: usize, out: &mut [f32]) {
    let (codes, scales) = src.split_at(bs * d);
    for t in r0..r1 {
        let s = rd_f16(scales, 2 * t);
        let o = &mut out[(t - r0) * d..(t - r0 + 1) * d];
        for (v, &q) in o.iter_mut().zip(&codes[t * d..(t + 1) * d]) {
            *v = f32::from(q as i8) * s;
        }
    }
}

// ---- per token, groups of channels ----

fn encode_tok(bits: u32, src: &[f32], bs: usize, d: usize, dst: &mut [u8]) {
    let levels = ((1u32 << bits) - 1) as f32;
    let g = group_size(d);
    let ng = d / g;
    let (codes, params) = dst.split_at_mut(packed_len(bits, bs * d));
    codes.fill(0);
    for t in 0..bs {
        for gi in 0..ng {
            let e0 = t * d + gi * g;
            let xs = &src[e0..e0 + g];
            let (lo, hi) = min_max(xs.iter().copied());
            let (scale, zero) = affine_params(lo, hi, levels);
            let p = 4 * (t * ng + gi);
            wr_f16(params, p, scale);
            wr_f16(params, p + 2, zero);
            let (s, z) = (scale.to_f32(), zero.to_f32());
            for (i, &x) in xs.iter().enumerate() {
                put_code(codes, bits, e0 + i, affine_code(x, s, z, levels));
            }
        }
    }
}

/// `out[i] = zero + code(e0 + i) · scale`.
#[inline(always)]
fn unpack_uniform<const BITS: usize>(
    codes: &[u8],
    e0: usize,
    scale: f32,
    zero: f32,
    out: &mut [f32],
) {
    let per = 8 / BITS;
    let mask = (1u8 << BITS) - 1;
    if e0.is_multiple_of(per) && out.len().is_multiple_of(per) {
        let bytes = &codes[e0 / per..(e0 + out.len()) / per];
        for (o, &b) in out.chunks_exact_mut(per).zip(bytes) {
            for (j, v) in o.iter_mut().enumerate() {
                *v = zero + f32::from((b >> (j * BITS)) & mask) * scale;
            }
        }
    } else {
        for (i, v) in out.iter_mut().enumerate() {
            *v = zero + f32::from(get_code::<BITS>(codes, e0 + i)) * scale;
        }
    }
}

fn decode_tok<const BITS: usize>(
    src: &[u8],
    bs: usize,
    d: usize,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) {
    let g = group_size(d);
    let ng = d / g;
    let (codes, params) = src.split_at(packed_len(BITS as u32, bs * d));
    for t in r0..r1 {
        for gi in 0..ng {
            let p = 4 * (t * ng + gi);
            let (s, z) = (rd_f16(params, p), rd_f16(params, p + 2));
            let o0 = (t - r0) * d + gi * g;
            unpack_uniform::<BITS>(codes, t * d + gi * g, s, z, &mut out[o0..o0 + g]);
        }
    }
}

// ---- per channel over the block ----

fn encode_chan(bits: u32, src: &[f32], bs: usize, d: usize, dst: &mut [u8]) {
    let levels = ((1u32 << bits) - 1) as f32;
    let (codes, params) = dst.split_at_mut(packed_len(bits, bs * d));
    codes.fill(0);
    for c in 0..d {
        let (lo, hi) = min_max((0..bs).map(|t| src[t * d + c]));
        let (scale, zero) = affine_params(lo, hi, levels);
        wr_f16(params, 2 * c, scale);
        wr_f16(params, 2 * (d + c), zero);
        let (s, z) = (scale.to_f32(), zero.to_f32());
        for t in 0..bs {
            let e = t * d + c;
            put_code(codes, bits, e, affine_code(src[e], s, z, levels));
        }
    }
}

/// `out[i] = zero[i] + code(e0 + i) · scale[i]`.
#[inline(always)]
fn unpack_channels<const BITS: usize>(
    codes: &[u8],
    e0: usize,
    scale: &[f32],
    zero: &[f32],
    out: &mut [f32],
) {
    let per = 8 / BITS;
    let mask = (1u8 << BITS) - 1;
    let n = out.len();
    let (scale, zero) = (&scale[..n], &zero[..n]);
    if e0.is_multiple_of(per) && n.is_multiple_of(per) {
        let bytes = &codes[e0 / per..(e0 + n) / per];
        for (((o, s), z), &b) in out
            .chunks_exact_mut(per)
            .zip(scale.chunks_exact(per))
            .zip(zero.chunks_exact(per))
            .zip(bytes)
        {
            for (j, ((v, &s), &z)) in o.iter_mut().zip(s).zip(z).enumerate() {
                *v = z + f32::from((b >> (j * BITS)) & mask) * s;
            }
        }
    } else {
        for (i, v) in out.iter_mut().enumerate() {
            *v = zero[i] + f32::from(get_code::<BITS>(codes, e0 + i)) * scale[i];
        }
    }
}

fn decode_chan<const BITS: usize>(
    src: &[u8],
    bs: usize,
    d: usize,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) {
    /// Channels whose parameters are converted to f32 at a time (on the stack).
    const CH: usize = 32;
    let (codes, params) = src.split_at(packed_len(BITS as u32, bs * d));
    let mut sc = [0f32; CH];
    let mut zr = [0f32; CH];
    for c0 in (0..d).step_by(CH) {
        let n = CH.min(d - c0);
        for (c, (s, z)) in sc[..n].iter_mut().zip(&mut zr[..n]).enumerate() {
            *s = rd_f16(params, 2 * (c0 + c));
            *z = rd_f16(params, 2 * (d + c0 + c));
        }
        for t in r0..r1 {
            let o0 = (t - r0) * d + c0;
            unpack_channels::<BITS>(codes, t * d + c0, &sc, &zr, &mut out[o0..o0 + n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Standard normal samples (Box–Muller), channels `outliers` scaled ×20.
    fn data(rng: &mut ChaCha8Rng, bs: usize, d: usize, outliers: &[usize]) -> Vec<f32> {
        let mut x: Vec<f32> = (0..bs * d)
            .map(|_| {
                let u: f32 = rng.random_range(f32::EPSILON..1.0);
                let v: f32 = rng.random_range(0.0..std::f32::consts::TAU);
                (-2.0 * u.ln()).sqrt() * v.cos()
            })
            .collect();
        for t in 0..bs {
            for &c in outliers {
                x[t * d + c] *= 20.0;
            }
        }
        x
    }

    fn enc(run: Run, x: &[f32], bs: usize, d: usize) -> Vec<u8> {
        let mut b = vec![0u8; run.bytes(bs, d)];
        run.encode(x, bs, d, &mut b);
        b
    }

    fn dec(run: Run, b: &[u8], bs: usize, d: usize, r0: usize, r1: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; (r1 - r0) * d];
        run.decode(b, bs, d, r0, r1, &mut out);
        out
    }

    /// The stored scale of element (t, c), read back from the bytes (None for bf16).
    fn elem_scale(run: Run, b: &[u8], bs: usize, d: usize, t: usize, c: usize) -> Option<f32> {
        match run {
            Run::Bf16 | Run::None => None,
            Run::Int8 => Some(rd_f16(b, bs * d + 2 * t)),
            Run::Tok(bits) => {
                let g = group_size(d);
                Some(rd_f16(
                    b,
                    packed_len(bits, bs * d) + 4 * (t * (d / g) + c / g),
                ))
            }
            Run::Chan(bits) => Some(rd_f16(b, packed_len(bits, bs * d) + 2 * c)),
        }
    }

    /// Checks every element against its bound; returns Σ|x − x̂| / Σ|x|.
    fn check_round_trip(run: Run, x: &[f32], bs: usize, d: usize) -> f64 {
        let b = enc(run, x, bs, d);
        let y = dec(run, &b, bs, d, 0, bs);
        let (mut err, mut mag) = (0f64, 0f64);
        for t in 0..bs {
            for c in 0..d {
                let (xv, yv) = (x[t * d + c], y[t * d + c]);
                let e = (xv - yv).abs();
                let bound = match elem_scale(run, &b, bs, d, t, c) {
                    None => xv.abs() / 256.0,
                    Some(s) => s / 2.0 * (1.0 + 1e-3) + 1e-6 * (xv.abs() + 1.0),
                };
                assert!(
                    e <= bound,
                    "{run:?} d={d} ({t},{c}): {xv} → {yv}, err {e} > {bound}"
                );
                err += f64::from(e);
                mag += f64::from(xv.abs());
            }
        }
        err / mag
    }

    #[test]
    fn sizes() {
        let expect = [
            (Codec::Bf16, 2048, 2048, 1.0),
            (Codec::Int8, 1056, 1056, 0.516),
            (Codec::Kivi4, 768, 640, 0.344),
            (Codec::Kivi2, 512, 384, 0.219),
            (Codec::K8v4, 1056, 640, 0.414),
        ];
        for (c, k, v, ratio) in expect {
            assert_eq!(
                (c.k_bytes(16, 64), c.v_bytes(16, 64)),
                (k, v),
                "{}",
                c.name()
            );
            assert!(
                (c.bytes_per_token_ratio(16, 64) - ratio).abs() < 1e-3,
                "{}",
                c.name()
            );
            assert_eq!(Codec::from_name(&c.name()), Some(c));
        }
        assert_eq!(Codec::from_name("fp8"), None);
        // mhc: no per-head K run (the latent is per layer), values in their own format.
        for (values, v) in [
            (MhcValues::Bf16, 2048),
            (MhcValues::Int8, 1056),
            (MhcValues::Kivi4, 640),
        ] {
            let c = Codec::Mhc { rank: 64, values };
            assert_eq!((c.k_bytes(16, 64), c.v_bytes(16, 64)), (0, v));
            assert_eq!(c.latent_rank(), Some(64));
            assert_eq!(c.name(), format!("mhc:64+{}", values.name()));
            assert_eq!(Codec::from_name(&c.name()), None, "not a plain codec");
        }
        // Unaligned 2-bit: 3·10 codes → 8 bytes.
        assert_eq!(Codec::Kivi2.k_bytes(3, 10), 8 + 40);
        assert_eq!(Codec::Kivi2.v_bytes(3, 10), 8 + 12);
    }

    #[test]
    fn round_trip_error_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(0xC0DEC);
        let (bs, d) = (16, 64);
        // Σ over 8 blocks of each kind, so the means are not one block's luck.
        let mut k_err = [0f64; 5];
        let mut v_err = [0f64; 5];
        let blocks = 8;
        for _ in 0..blocks {
            let k = data(&mut rng, bs, d, &[3, 40]);
            let v = data(&mut rng, bs, d, &[]);
            for (i, c) in Codec::PLAIN.into_iter().enumerate() {
                k_err[i] += check_round_trip(c.k_run(), &k, bs, d) / blocks as f64;
                v_err[i] += check_round_trip(c.v_run(), &v, bs, d) / blocks as f64;
            }
        }
        for (i, c) in Codec::PLAIN.into_iter().enumerate() {
            eprintln!(
                "{:>6}: K (outlier channels) {:6.2}%  V {:6.2}%",
                c.name(),
                100.0 * k_err[i],
                100.0 * v_err[i]
            );
        }
        let [bf, i8_, kivi4, kivi2, k8v4] = [0, 1, 2, 3, 4];
        assert!(k_err[bf] < 0.003 && v_err[bf] < 0.003);
        assert!(v_err[i8_] < 0.015, "int8 V {}", v_err[i8_]);
        assert!(k_err[i8_] < 0.05, "int8 K {}", k_err[i8_]);
        assert!(k_err[kivi4] < 0.08, "kivi4 K {}", k_err[kivi4]);
        assert!(v_err[kivi4] < 0.12, "kivi4 V {}", v_err[kivi4]);
        assert!(k_err[kivi2] < 0.45, "kivi2 K {}", k_err[kivi2]);
        assert!(v_err[kivi2] < 0.45, "kivi2 V {}", v_err[kivi2]);
        assert_eq!(k_err[k8v4], k_err[i8_]);
        assert_eq!(v_err[k8v4], v_err[kivi4]);

        // Generic shapes: groups of `d` (d % 32 != 0), 2-bit rows not byte-aligned, odd bs.
        for (bs, d) in [(16, 10), (3, 10), (5, 6), (16, 96)] {
            let x = data(&mut rng, bs, d, &[1]);
            for c in Codec::PLAIN {
                check_round_trip(c.k_run(), &x, bs, d);
                check_round_trip(c.v_run(), &x, bs, d);
            }
        }
    }

    #[test]
    fn sub_range_decode_matches_full_decode() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (bs, d) in [(16, 64), (5, 10), (7, 6)] {
            let x = data(&mut rng, bs, d, &[1]);
            for c in Codec::PLAIN {
                for run in [c.k_run(), c.v_run()] {
                    let b = enc(run, &x, bs, d);
                    let full = dec(run, &b, bs, d, 0, bs);
                    for r0 in 0..=bs {
                        for r1 in r0..=bs {
                            let part = dec(run, &b, bs, d, r0, r1);
                            assert_eq!(part, full[r0 * d..r1 * d], "{run:?} {r0}..{r1}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn per_channel_keys_beat_per_token_on_outlier_channels() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (bs, d) = (16, 64);
        let k = data(&mut rng, bs, d, &[3, 40]);
        let per_channel = check_round_trip(Codec::Kivi4.k_run(), &k, bs, d);
        let per_token = check_round_trip(Codec::Kivi4.v_run(), &k, bs, d);
        eprintln!(
            "4-bit on outlier-channel keys: per channel {:.2}%, per token {:.2}%",
            100.0 * per_channel,
            100.0 * per_token
        );
        assert!(
            per_channel * 3.0 < per_token,
            "{per_channel} vs {per_token}"
        );
        let per_channel2 = check_round_trip(Codec::Kivi2.k_run(), &k, bs, d);
        let per_token2 = check_round_trip(Codec::Kivi2.v_run(), &k, bs, d);
        assert!(
            per_channel2 * 1.5 < per_token2,
            "{per_channel2} vs {per_token2}"
        );
    }

    #[test]
    fn constants_and_zeros_exact_and_non_finite_safe() {
        let (bs, d) = (16, 64);
        let zeros = vec![0f32; bs * d];
        // Each channel constant over the tokens and each token-group constant too: all one value
        // per block, varying across blocks; f16-representable so asymmetric formats are exact.
        for val in [0.0f32, 1.5, -3.25, 1000.0] {
            let x = vec![val; bs * d];
            for c in Codec::PLAIN {
                for run in [c.k_run(), c.v_run()] {
                    let y = dec(run, &enc(run, &x, bs, d), bs, d, 0, bs);
                    if run != Run::Int8 || val == 0.0 {
                        assert_eq!(y, x, "{run:?} {val}");
                    }
                    if let Run::Tok(_) | Run::Chan(_) = run {
                        assert_eq!(
                            elem_scale(run, &enc(run, &x, bs, d), bs, d, 0, 0),
                            Some(0.0)
                        );
                    }
                }
            }
        }
        // Constant channels with different values per channel: per-channel scales are 0.
        let x: Vec<f32> = (0..bs * d).map(|i| (i % d) as f32 * 0.5 - 8.0).collect();
        for bits in [2, 4] {
            let run = Run::Chan(bits);
            assert_eq!(dec(run, &enc(run, &x, bs, d), bs, d, 0, bs), x);
        }
        // Constant rows with different values per row: per-token scales are 0.
        let x: Vec<f32> = (0..bs * d).map(|i| (i / d) as f32 * 0.25 - 2.0).collect();
        for bits in [2, 4] {
            let run = Run::Tok(bits);
            assert_eq!(dec(run, &enc(run, &x, bs, d), bs, d, 0, bs), x);
        }
        for c in Codec::PLAIN {
            for run in [c.k_run(), c.v_run()] {
                assert_eq!(dec(run, &enc(run, &zeros, bs, d), bs, d, 0, bs), zeros);
            }
        }

        // Non-finite and out-of-f16-range input: no panic; quantized formats decode finite.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut x = data(&mut rng, bs, d, &[]);
        x[0] = f32::NAN;
        x[d + 5] = f32::INFINITY;
        x[2 * d + 7] = f32::NEG_INFINITY;
        x[3 * d + 9] = 1e30;
        x[4 * d + 11] = -1e30;
        x[5 * d + 1] = f32::MAX;
        x[5 * d + 2] = f32::MIN;
        for i in 0..bs {
            x[i * d + 63] = f32::NAN; // a NaN channel
        }
        x[6 * d..7 * d].fill(f32::NAN); // a NaN token
        for c in Codec::PLAIN {
            for run in [c.k_run(), c.v_run()] {
                let b = enc(run, &x, bs, d);
                let y = dec(run, &b, bs, d, 0, bs);
                if run != Run::Bf16 {
                    assert!(y.iter().all(|v| v.is_finite()), "{run:?}");
                    // The finite, in-range elements far from the huge ones keep their bound.
                    let t = 10;
                    for ch in 0..8 {
                        let s = elem_scale(run, &b, bs, d, t, ch).unwrap();
                        if s < 1.0 && !matches!(run, Run::Chan(_)) {
                            let e = (x[t * d + ch] - y[t * d + ch]).abs();
                            assert!(e <= s / 2.0 * 1.001 + 1e-6, "{run:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn encode_is_deterministic() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let x = data(&mut rng, 16, 64, &[3, 40]);
        for c in Codec::PLAIN {
            for run in [c.k_run(), c.v_run()] {
                // Dirty destination buffers: encode must overwrite every byte.
                let mut a = vec![0xAAu8; run.bytes(16, 64)];
                let mut b = vec![0x55u8; run.bytes(16, 64)];
                run.encode(&x, 16, 64, &mut a);
                run.encode(&x, 16, 64, &mut b);
                assert_eq!(a, b, "{run:?}");
            }
        }
    }

    #[test]
    fn f16_rounding_directions() {
        for x in [
            0.1f32, -0.1, 1e-9, -1e-9, 3.0, 65503.9, 7e4, -7e4, 0.0, -0.0,
        ] {
            let (u, dn) = (f16_up(x).to_f32(), f16_down(x).to_f32());
            let clamped = x.clamp(-F16_MAX, F16_MAX);
            assert!(u >= clamped && dn <= clamped, "{x}: {dn} {u}");
            assert!(u - dn <= (x.abs() * 1e-3).max(1e-7), "{x}: {dn} {u}");
        }
        assert_eq!(f16_up(f32::INFINITY), f16::MAX);
        assert_eq!(f16_down(f32::NEG_INFINITY), f16::MIN);
        assert_eq!(f16_up(f32::NAN), f16::ZERO);
    }
}
