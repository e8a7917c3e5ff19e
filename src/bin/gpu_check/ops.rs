//! Op-by-op parity of the CUDA backend against the CPU backend on random inputs.

use super::{error_row, parity, Row};
use anyhow::Result;
use half::bf16;
use kvserve::backend::cpu::CpuBackend;
use kvserve::backend::cuda::kernels::{GEMV_DEFAULT_ROWS, GEMV_MAX_ROWS};
use kvserve::backend::cuda::parity::random_vec;
use kvserve::backend::cuda::CudaBackend;
use kvserve::backend::{AttnSeq, AttnShape, Backend, RopeParams};
use kvserve::model::tensor::{HostData, HostTensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::borrow::Cow;

fn read_all<B: Backend>(b: &B, buf: &B::Buf, len: usize) -> Vec<f32> {
    let mut v = vec![0f32; len];
    b.read(buf, 0, &mut v);
    v
}

fn matrix(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> HostTensor<'static> {
    let data: Vec<bf16> = random_vec(rng, rows * cols, (3.0 / cols as f32).sqrt())
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    HostTensor {
        name: "w".into(),
        shape: vec![rows, cols],
        data: HostData::Bf16(Cow::Owned(data)),
    }
}

pub fn run(gpu: &CudaBackend, rows: &mut Vec<Row>) -> Result<()> {
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(1);

    // Embedding gather (exact: bf16 widened to f32).
    let table = matrix(&mut rng, 1000, 2048);
    let (tc, tg) = (cpu.upload_matrix(&[&table])?, gpu.upload_matrix(&[&table])?);
    let ids: Vec<u32> = (0..37).map(|i| (i * 389 + 11) % 1000).collect();
    let (mut oc, mut og) = (cpu.alloc(37 * 2048), gpu.alloc(37 * 2048));
    cpu.embed(&tc, &ids, &mut oc);
    gpu.embed(&tg, &ids, &mut og);
    rows.push(parity(
        "embed [37 ids, 2048]",
        &read_all(gpu, &og, oc.len()),
        &oc,
        "",
    ));

    // RMSNorm.
    let x = random_vec(&mut rng, 33 * 2048, 2.0);
    let w = random_vec(&mut rng, 2048, 1.5);
    let (xg, wg) = (gpu.upload(&x), gpu.upload(&w));
    let (mut oc, mut og) = (cpu.alloc(x.len()), gpu.alloc(x.len()));
    cpu.rms_norm(&x, &w, 1e-5, 33, &mut oc);
    gpu.rms_norm(&xg, &wg, 1e-5, 33, &mut og);
    rows.push(parity(
        "rms_norm [33, 2048]",
        &read_all(gpu, &og, oc.len()),
        &oc,
        "",
    ));

    // The residual add fused with RMSNorm: both outputs (the sum and its norm).
    let y = random_vec(&mut rng, x.len(), 2.0);
    let (mut xc, mut xg, yg) = (x.clone(), gpu.upload(&x), gpu.upload(&y));
    cpu.add_rms_norm(&mut xc, &y, &w, 1e-5, 33, &mut oc);
    gpu.add_rms_norm(&mut xg, &yg, &wg, 1e-5, 33, &mut og);
    rows.push(parity(
        "add_rms_norm [33, 2048]: sum",
        &read_all(gpu, &xg, xc.len()),
        &xc,
        "",
    ));
    rows.push(parity(
        "add_rms_norm [33, 2048]: norm",
        &read_all(gpu, &og, oc.len()),
        &oc,
        "",
    ));

    // Matrix products: the few-row kernel (up to GEMV_MAX_ROWS rows), cuBLAS with split hi/lo
    // activations and with plain bf16 ones.
    for &(m, k, n) in &[
        (1usize, 2048usize, 6144usize),
        (3, 576, 49_152),
        (8, 8192, 2048),
        (37, 2048, 16384),
        (128, 8192, 2048),
    ] {
        let wt = matrix(&mut rng, n, k);
        let (wc, wg) = (cpu.upload_matrix(&[&wt])?, gpu.upload_matrix(&[&wt])?);
        let x = random_vec(&mut rng, m * k, 2.0);
        let xg = gpu.upload(&x);
        let mut oc = cpu.alloc(m * n);
        cpu.matmul(&x, m, &wc, &mut oc);
        let few = m <= GEMV_MAX_ROWS;
        for (gemv, split) in [(true, true), (false, true), (false, false)] {
            if gemv && !few {
                continue;
            }
            gpu.set_gemv_max_rows(if gemv { GEMV_MAX_ROWS } else { 0 });
            gpu.set_split_matmul(split);
            let mut og = gpu.alloc(m * n);
            gpu.matmul(&xg, m, &wg, &mut og);
            let (how, note) = match (gemv, split) {
                (true, _) => ("gemv", "gemv.cu: f32 rows, bf16 weights, f32 accumulate"),
                (false, true) => ("hi+lo", "cuBLAS GemmEx bf16, f32 accumulate"),
                (false, false) => ("plain bf16", "cuBLAS GemmEx bf16, f32 accumulate"),
            };
            rows.push(parity(
                &format!("matmul [{m}x{k}]·[{n}x{k}]ᵀ {how}"),
                &read_all(gpu, &og, oc.len()),
                &oc,
                note,
            ));
        }
        gpu.set_split_matmul(true);
        gpu.set_gemv_max_rows(GEMV_DEFAULT_ROWS);
    }

    // Element-wise ops.
    let (r, width) = (19usize, 3000usize);
    let x = random_vec(&mut rng, r * width, 3.0);
    let y = random_vec(&mut rng, r * width, 3.0);
    let b = random_vec(&mut rng, width, 1.0);
    let (mut xc, mut xg) = (x.clone(), gpu.upload(&x));
    let (yg, bg) = (gpu.upload(&y), gpu.upload(&b));
    cpu.add(&mut xc, &y, x.len());
    gpu.add(&mut xg, &yg, x.len());
    rows.push(parity(
        "add [19 x 3000]",
        &read_all(gpu, &xg, x.len()),
        &xc,
        "",
    ));
    cpu.add_bias(&mut xc, &b, r);
    gpu.add_bias(&mut xg, &bg, r);
    rows.push(parity(
        "add_bias [19 x 3000]",
        &read_all(gpu, &xg, x.len()),
        &xc,
        "",
    ));
    let (mut sc, mut sg) = (cpu.alloc(r * width / 2), gpu.alloc(r * width / 2));
    cpu.silu_mul(&xc, r, width / 2, &mut sc);
    gpu.silu_mul(&xg, r, width / 2, &mut sg);
    rows.push(parity(
        "silu_mul [19 x 1500]",
        &read_all(gpu, &sg, sc.len()),
        &sc,
        "",
    ));
    let pick = [7usize, 0, 18, 7];
    let gc = cpu.gather_rows(&xc, &pick, width);
    let gg = gpu.gather_rows(&xg, &pick, width);
    rows.push(parity(
        "gather_rows [4 of 19]",
        &read_all(gpu, &gg, gc.len()),
        &gc,
        "",
    ));

    // Greedy tokens (sampling.cu): one index per row, the CPU's rule (ties to the lowest index,
    // NaN as -inf). Rows 1-3 plant a tie across warps, a NaN above the maximum, and +inf twice.
    let vocab = 32_000;
    let mut x = random_vec(&mut rng, 9 * vocab, 8.0);
    x[vocab + 9_000] = 50.0;
    x[vocab + 300] = 50.0;
    x[2 * vocab + 5] = f32::NAN;
    x[3 * vocab + 777] = f32::INFINITY;
    x[3 * vocab + 31_999] = f32::INFINITY;
    let want = cpu.argmax_rows(&x, 1..9, vocab);
    let got = gpu.argmax_rows(&gpu.upload(&x), 1..9, vocab);
    let wrong = want.iter().zip(&got).filter(|(a, b)| a != b).count();
    rows.push(error_row(
        "argmax_rows [8 of 9 x 32000]",
        wrong as f64,
        "greedy tokens: rows that differ from the CPU's",
    ));

    // Drawn tokens (sampling.cu draw_dense_f32): the CPU's very token for each row and uniform,
    // 256 rows at temperatures 0.3 … 1.5 (the exact f32 order of the block sums, no FMA), plus
    // the masked and +inf rows above.
    let n = 256;
    let mut x = random_vec(&mut rng, n * vocab, 6.0);
    x[..vocab].fill(f32::NEG_INFINITY);
    x[vocab + 123] = f32::INFINITY;
    let draws: Vec<(f32, f64)> = (0..n)
        .map(|i| {
            (
                1.0 / (0.3 + 0.3 * (i % 5) as f32),
                (i as f64 * 0.618_034) % 1.0,
            )
        })
        .collect();
    let want = cpu.draw_rows(&x, 0..n, vocab, &draws);
    let got = gpu.draw_rows(&gpu.upload(&x), 0..n, vocab, &draws);
    let wrong = want.iter().zip(&got).filter(|(a, b)| a != b).count();
    rows.push(error_row(
        "draw_rows [256 x 32000]",
        wrong as f64,
        "temperature draws: rows that differ from the CPU's",
    ));

    Ok(())
}

/// RoPE + KV write, then one mixed batch (prompt chunks after cached prefixes, short and long
/// decode rows: the split-K path), then copy-on-write block copies read back by attention.
pub fn attention(gpu: &CudaBackend, rows: &mut Vec<Row>) {
    let (cpu, rng) = (&CpuBackend::new(), &mut ChaCha8Rng::seed_from_u64(2));
    let shape = AttnShape {
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 64,
    };
    let bs = 16;
    let nblocks = 1024;
    let rope = RopeParams {
        inv_freq: (0..32)
            .map(|i| 500_000f32.powf(-(2 * i) as f32 / 64.0))
            .collect(),
        attention_scaling: 1.0,
    };
    let (mut kc, mut kg) = (
        cpu.new_kv_store(2, nblocks, bs, shape),
        gpu.new_kv_store(2, nblocks, bs, shape),
    );
    let mut ids: Vec<u32> = (0..nblocks as u32).collect();
    ids.shuffle(rng);
    // (cached prefix, new rows) per sequence: two prompt chunks, two decode rows (one long).
    let plan = [(0usize, 45usize), (300, 20), (1500, 1), (3000, 1), (77, 1)];
    let mut tables = Vec::new();
    let mut next = 0;
    for &(pre, new) in &plan {
        let n = (pre + new).div_ceil(bs);
        tables.push(ids[next..next + n].to_vec());
        next += n;
    }
    let width = shape.qkv_width();
    let layer = 1;
    let slots = |t: &[u32], p0: usize, p1: usize| -> Vec<u32> {
        (p0..p1)
            .map(|p| t[p / bs] * bs as u32 + (p % bs) as u32)
            .collect()
    };
    // Cached prefixes, written through rope_and_store on both backends.
    for (s, &(pre, _)) in plan.iter().enumerate() {
        if pre == 0 {
            continue;
        }
        let qkv = random_vec(rng, pre * width, 1.5);
        let pos: Vec<u32> = (0..pre as u32).collect();
        let sl = slots(&tables[s], 0, pre);
        let (mut qc, mut qg) = (qkv.clone(), gpu.upload(&qkv));
        cpu.rope_and_store(&mut qc, pre, &pos, &sl, shape, &rope, &mut kc, layer);
        gpu.rope_and_store(&mut qg, pre, &pos, &sl, shape, &rope, &mut kg, layer);
    }
    // The mixed batch.
    let total: usize = plan.iter().map(|p| p.1).sum();
    let qkv = random_vec(rng, total * width, 1.5);
    let (mut pos, mut sl) = (Vec::new(), Vec::new());
    for (s, &(pre, new)) in plan.iter().enumerate() {
        pos.extend((pre..pre + new).map(|p| p as u32));
        sl.extend(slots(&tables[s], pre, pre + new));
    }
    let (mut qc, mut qg) = (qkv.clone(), gpu.upload(&qkv));
    cpu.rope_and_store(&mut qc, total, &pos, &sl, shape, &rope, &mut kc, layer);
    gpu.rope_and_store(&mut qg, total, &pos, &sl, shape, &rope, &mut kg, layer);
    rows.push(parity(
        "rope (q and k of 68 rows, pos <= 3000)",
        &read_all(gpu, &qg, qc.len()),
        &qc,
        "",
    ));
    let seqs: Vec<AttnSeq<'_>> = plan
        .iter()
        .zip(&tables)
        .map(|(&(pre, new), t)| AttnSeq {
            rows: new,
            start_pos: pre,
            block_table: t,
            policy: kvserve::kv::policy::KvPolicy::EXACT,
        })
        .collect();
    let (mut oc, mut og) = (
        cpu.alloc(total * shape.q_width()),
        gpu.alloc(total * shape.q_width()),
    );
    cpu.attention(&qc, &seqs, shape, &kc, layer, &mut oc);
    gpu.attention(&qg, &seqs, shape, &kg, layer, &mut og);
    let got = read_all(gpu, &og, oc.len());
    rows.push(parity(
        "attention mixed batch (rope_and_store'd bf16 KV)",
        &got,
        &oc,
        "chunks 45@0, 20@300; decode @1500, @3000, @77",
    ));
    // The decode rows' context splits merged in the decode launch (the last split to finish
    // merges; the default) against a second launch merging them: the same arithmetic, so the
    // same bits, every time, whichever CTA finishes last (30 runs of the batch).
    gpu.set_fused_merge(false);
    let mut sep = gpu.alloc(total * shape.q_width());
    gpu.attention(&qg, &seqs, shape, &kg, layer, &mut sep);
    gpu.set_fused_merge(true);
    let want = read_all(gpu, &sep, oc.len());
    let differing = (0..30)
        .filter(|_| {
            gpu.attention(&qg, &seqs, shape, &kg, layer, &mut og);
            read_all(gpu, &og, oc.len()) != want
        })
        .count();
    rows.push(super::error_row(
        "decode split merge in the launch equals a separate merge launch",
        if differing == 0 { 0.0 } else { f64::INFINITY },
        &format!("bitwise; {differing} of 30 runs differed"),
    ));
    let q = shape.q_width();
    let (a, b) = (45 + 20, 45 + 20 + 3);
    rows.push(parity(
        "attention decode rows only (split-K)",
        &got[a * q..b * q],
        &oc[a * q..b * q],
        "",
    ));

    // Copy-on-write: sequence 3's blocks copied to unused blocks, then read through the copy.
    let fresh = ids[next..next + tables[3].len()].to_vec();
    let pairs: Vec<(u32, u32)> = tables[3]
        .iter()
        .copied()
        .zip(fresh.iter().copied())
        .collect();
    cpu.copy_blocks(&mut kc, &pairs);
    gpu.copy_blocks(&mut kg, &pairs);
    let row = 45 + 20 + 1;
    let one_q = qc[row * width..(row + 1) * width].to_vec();
    let seq = [AttnSeq {
        rows: 1,
        start_pos: 3000,
        block_table: &fresh,
        policy: kvserve::kv::policy::KvPolicy::EXACT,
    }];
    let (mut oc2, mut og2) = (cpu.alloc(q), gpu.alloc(q));
    let qg1 = gpu.upload(&one_q);
    cpu.attention(&one_q, &seq, shape, &kc, layer, &mut oc2);
    gpu.attention(&qg1, &seq, shape, &kg, layer, &mut og2);
    let got2 = read_all(gpu, &og2, q);
    rows.push(parity(
        "copy_blocks then decode through the copies",
        &got2,
        &oc2,
        "",
    ));
    // Through the original blocks alone (same split plan): exactly the same bits.
    let orig = [AttnSeq {
        rows: 1,
        start_pos: 3000,
        block_table: &tables[3],
        policy: kvserve::kv::policy::KvPolicy::EXACT,
    }];
    let mut og3 = gpu.alloc(q);
    gpu.attention(&qg1, &orig, shape, &kg, layer, &mut og3);
    let same = got2 == read_all(gpu, &og3, q);
    rows.push(super::error_row(
        "copy_blocks: copy reads equal the original",
        if same { 0.0 } else { f64::INFINITY },
        "bitwise",
    ));
}
