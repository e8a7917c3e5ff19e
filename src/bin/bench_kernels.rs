//! CPU kernel benchmark on the default model's shapes (SmolLM-135M: hidden 576, 9 heads of 64,
//! 3 KV heads, intermediate 1536, vocab 49152, 30 layers, bf16 weights).
//!
//! Prints decode matvec GB/s (weight bytes streamed per second, 1 activation row, weights cycled
//! through > 256 MiB of copies so they come from DRAM, not L3), a whole-model decode sweep,
//! a whole-model rows sweep (1..32 rows, weights from DRAM; 2..32 also with the previous
//! kernel, `old`, interleaved), the same whole model in the GGUF file's formats (`Q4_1` layers,
//! `Q8_0` head) against bf16 by rows (`quant`), GFLOP/s by number of rows on one L2/L3-resident matrix
//! (batched decode), prefill GFLOP/s at 512 rows, and attention
//! timings (paged vs one contiguous block).
//!
//! `cargo run --release --bin bench_kernels [-- quick]`

use half::{bf16, f16};
use kvserve::backend::cpu::attention::attention;
use kvserve::backend::cpu::kv_store::CpuKvStore;
use kvserve::backend::cpu::matmul::{matmul, CpuMatrix, GROUP_PREFETCH, QUANT_REGISTER_ROWS};
use kvserve::backend::cpu::simd;
use kvserve::backend::{AttnSeq, AttnShape};
use kvserve::model::tensor::{HostData, HostTensor, QuantData, QuantKind};
use std::borrow::Cow;
use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn bf16_matrix(rows: usize, cols: usize, seed: u64) -> CpuMatrix {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<bf16> = (0..rows * cols)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        })
        .collect();
    let t = HostTensor {
        name: "w".into(),
        shape: vec![rows, cols],
        data: HostData::Bf16(Cow::Owned(data)),
    };
    CpuMatrix::from_parts(&[&t]).expect("valid shape")
}

/// A random `[rows, cols]` matrix of `kind` blocks (scales around 1/64, every quant value).
fn quant_matrix(kind: QuantKind, rows: usize, cols: usize, seed: u64) -> CpuMatrix {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut blocks = Vec::with_capacity(rows * cols / 32 * kind.block_bytes());
    for _ in 0..rows * cols / 32 {
        blocks.extend(f16::from_f32(1.0 / 64.0).to_le_bytes());
        let quant_bytes = match kind {
            QuantKind::Q4_1 => {
                blocks.extend(f16::from_f32(-0.1).to_le_bytes());
                16
            }
            QuantKind::Q8_0 => 32,
        };
        blocks.extend((0..quant_bytes).map(|_| next() as u8));
    }
    let t = HostTensor {
        name: "w".into(),
        shape: vec![rows, cols],
        data: HostData::Quant(QuantData {
            kind,
            blocks: Cow::Owned(blocks),
        }),
    };
    CpuMatrix::from_parts(&[&t]).expect("valid shape")
}

fn acts(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

/// Runs `f` for about `min` (after one warm-up call) in batches of ~10 ms and returns the
/// fastest batch's seconds per call: the machine is shared, and the least disturbed batch is
/// the most repeatable figure.
fn time(min: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let t0 = Instant::now();
    let mut best = f64::MAX;
    while t0.elapsed() < min || best == f64::MAX {
        let (t, mut n) = (Instant::now(), 0u32);
        while t.elapsed() < Duration::from_millis(10) || n == 0 {
            f();
            n += 1;
        }
        best = best.min(t.elapsed().as_secs_f64() / n as f64);
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "quick");
    // Sections to run (all when none is named): mem decode sweep dram cross prefill attn.
    let names = [
        "mem", "decode", "sweep", "dram", "quant", "cross", "prefill", "attn",
    ];
    let all = !args.iter().any(|a| names.contains(&a.as_str()));
    let on = |s: &str| all || args.iter().any(|a| a == s);
    let min = Duration::from_millis(if quick { 300 } else { 1500 });
    println!(
        "cpu kernels: simd={} threads={}",
        simd::avx2_fma(),
        rayon::current_num_threads()
    );
    // The ceiling: a plain streaming read of 512 MiB (sum of u64) on 1 and on all threads.
    if on("mem") {
        use rayon::prelude::*;
        let buf: Vec<u64> = (0..64u64 << 20).collect();
        let t1 = time(min, || {
            black_box(buf.iter().fold(0u64, |a, &b| a.wrapping_add(b)));
        });
        let tn = time(min, || {
            black_box(
                buf.par_chunks(1 << 16)
                    .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
                    .reduce(|| 0, u64::wrapping_add),
            );
        });
        let gb = (buf.len() * 8) as f64 / 1e9;
        println!(
            "memory read ceiling: 1 thread {:.1} GB/s, all threads {:.1} GB/s",
            gb / t1,
            gb / tn
        );
    }
    let shapes = [
        ("qkv 576->960", 576, 960),
        ("o 576->576", 576, 576),
        ("gate_up 576->3072", 576, 3072),
        ("down 1536->576", 1536, 576),
        ("lm_head 576->49152", 576, 49152),
    ];

    if on("decode") {
        println!("\n== decode matvec, 1 row, bf16 weights from DRAM (cycling > 256 MiB of copies)");
        for &(name, k, n) in &shapes {
            let bytes = n * k * 2;
            let copies = (256usize << 20).div_ceil(bytes).max(2);
            let ws: Vec<CpuMatrix> = (0..copies).map(|c| bf16_matrix(n, k, c as u64)).collect();
            let x = acts(k);
            let mut out = vec![0f32; n];
            let mut i = 0;
            let t = time(min, || {
                matmul(&x, 1, &ws[i % copies], &mut out);
                i += 1;
                black_box(&out);
            });
            println!(
                "{name:<22} {:8.1} us  {:6.1} GB/s",
                t * 1e6,
                bytes as f64 / t / 1e9
            );
        }
    }
    if on("sweep") {
        println!("\n== whole-model decode sweep (30 layers x qkv/o/gate_up/down + lm_head, 1 row)");
        let layers: Vec<[CpuMatrix; 4]> = (0..30)
            .map(|l| {
                let s = l as u64 * 8;
                [
                    bf16_matrix(960, 576, s),
                    bf16_matrix(576, 576, s + 1),
                    bf16_matrix(3072, 576, s + 2),
                    bf16_matrix(576, 1536, s + 3),
                ]
            })
            .collect();
        let head = bf16_matrix(49152, 576, 999);
        let total: usize = layers
            .iter()
            .flatten()
            .chain([&head])
            .map(|m| m.bytes())
            .sum();
        let (x576, x1536) = (acts(576), acts(1536));
        let mut out = vec![0f32; 49152];
        let t = time(min * 2, || {
            for l in &layers {
                matmul(&x576, 1, &l[0], &mut out);
                matmul(&x576, 1, &l[1], &mut out);
                matmul(&x576, 1, &l[2], &mut out);
                matmul(&x1536, 1, &l[3], &mut out);
            }
            matmul(&x576, 1, &head, &mut out);
            black_box(&out);
        });
        println!(
            "{:.1} MiB per token: {:.2} ms/token  {:.1} GB/s  ({:.0} tokens/s matmul-only)",
            total as f64 / (1 << 20) as f64,
            t * 1e3,
            total as f64 / t / 1e9,
            1.0 / t
        );
    }
    if on("dram") {
        println!(
            "\n== rows sweep, DRAM-resident weights (whole model: 30 layers x qkv/o/gate_up/down + lm_head)"
        );
        let layers: Vec<[CpuMatrix; 4]> = (0..30)
            .map(|l| {
                let s = l as u64 * 8 + 3;
                [
                    bf16_matrix(960, 576, s),
                    bf16_matrix(576, 576, s + 1),
                    bf16_matrix(3072, 576, s + 2),
                    bf16_matrix(576, 1536, s + 3),
                ]
            })
            .collect();
        let head = bf16_matrix(49152, 576, 998);
        let all: Vec<&CpuMatrix> = layers.iter().flatten().chain([&head]).collect();
        let params: usize = all.iter().map(|m| m.rows * m.cols).sum();
        let bytes: usize = all.iter().map(|m| m.bytes()).sum();
        // One pass streams > 256 MiB, so every matrix comes from DRAM (L3 is 32 MiB).
        let copies = (256usize << 20).div_ceil(bytes).max(1);
        println!(
            "{:.1} M params, {:.1} MiB x {copies} cop{}",
            params as f64 / 1e6,
            bytes as f64 / (1 << 20) as f64,
            if copies == 1 { "y" } else { "ies" }
        );
        let (x576, x1536) = (acts(32 * 576), acts(32 * 1536));
        let mut out = vec![0f32; 32 * 49152];
        // `new`: the kernel as shipped; `old`: without the next-group prefetch of 2..=32 rows.
        // Interleaved, so that both see the same machine.
        let mut pass = |rows: usize, prefetch: bool| {
            GROUP_PREFETCH.store(prefetch, Ordering::Relaxed);
            time(min, || {
                for m in &all {
                    let x = if m.cols == 576 { &x576 } else { &x1536 };
                    matmul(x, rows, m, &mut out);
                }
                black_box(&out);
            })
        };
        for rows in [1, 2, 4, 8, 16, 32] {
            let (mut tn, mut to) = (f64::MAX, f64::MAX);
            for _ in 0..2 {
                tn = tn.min(pass(rows, true));
                if rows > 1 {
                    to = to.min(pass(rows, false));
                }
            }
            let gf = |t: f64| 2.0 * (rows * params) as f64 / t / 1e9;
            print!(
                "rows {rows:>3}: new {:7.2} ms/pass {:6.1} GFLOP/s {:5.1} GB/s",
                tn * 1e3,
                gf(tn),
                bytes as f64 / tn / 1e9
            );
            if rows > 1 {
                print!(
                    " | old {:7.2} ms {:6.1} GFLOP/s | x{:.2}",
                    to * 1e3,
                    gf(to),
                    to / tn
                );
            }
            println!();
        }
        GROUP_PREFETCH.store(true, Ordering::Relaxed);
    }
    if on("quant") {
        println!(
            "\n== whole model, bf16 vs the GGUF's formats (Q4_1 layers, Q8_0 head), DRAM-resident, by rows"
        );
        let model = |q: bool| -> Vec<CpuMatrix> {
            let mut v = Vec::new();
            for l in 0..30u64 {
                for (i, (r, c)) in [(960, 576), (576, 576), (3072, 576), (576, 1536)]
                    .into_iter()
                    .enumerate()
                {
                    let seed = l * 8 + i as u64;
                    v.push(if q {
                        quant_matrix(QuantKind::Q4_1, r, c, seed)
                    } else {
                        bf16_matrix(r, c, seed)
                    });
                }
            }
            v.push(if q {
                quant_matrix(QuantKind::Q8_0, 49152, 576, 999)
            } else {
                bf16_matrix(49152, 576, 999)
            });
            v
        };
        let (b, q) = (model(false), model(true));
        let mb =
            |m: &[CpuMatrix]| m.iter().map(|m| m.bytes()).sum::<usize>() as f64 / (1 << 20) as f64;
        println!(
            "bf16 {:.1} MiB, quantized {:.1} MiB (L3 is 32 MiB: both stream from DRAM)",
            mb(&b),
            mb(&q)
        );
        let (x576, x1536) = (acts(512 * 576), acts(512 * 1536));
        let mut out = vec![0f32; 512 * 49152];
        let mut pass = |all: &[CpuMatrix], rows: usize| {
            time(min, || {
                for m in all {
                    let x = if m.cols == 576 { &x576 } else { &x1536 };
                    matmul(x, rows, m, &mut out);
                }
                black_box(&out);
            })
        };
        let default_rows = QUANT_REGISTER_ROWS.load(Ordering::Relaxed);
        for rows in [1, 2, 4, 8, 16, 32, 64, 512] {
            let (mut tb, mut tq, mut tp) = (f64::MAX, f64::MAX, f64::MAX);
            for _ in 0..2 {
                tb = tb.min(pass(&b, rows));
                tq = tq.min(pass(&q, rows));
                if rows <= default_rows {
                    // The same product through the f32 panel instead of in-register widening.
                    QUANT_REGISTER_ROWS.store(0, Ordering::Relaxed);
                    tp = tp.min(pass(&q, rows));
                    QUANT_REGISTER_ROWS.store(default_rows, Ordering::Relaxed);
                }
            }
            print!(
                "rows {rows:>3}: bf16 {:7.2} ms  quantized {:7.2} ms  x{:.2}",
                tb * 1e3,
                tq * 1e3,
                tb / tq
            );
            if tp < f64::MAX {
                print!("  | via f32 panel {:7.2} ms x{:.2}", tp * 1e3, tb / tp);
            }
            println!();
        }
    }
    if on("cross") {
        println!("\n== rows sweep on gate_up 576->3072 (L2/L3-resident weights)");
        let w = bf16_matrix(3072, 576, 42);
        for rows in [1, 2, 4, 8, 16, 32, 48, 64, 96, 128] {
            let x = acts(rows * 576);
            let mut out = vec![0f32; rows * 3072];
            let t = time(min / 3, || matmul(&x, rows, &w, &mut out));
            let gf = 2.0 * (rows * 3072 * 576) as f64 / t / 1e9;
            println!("rows {rows:>3}: {:8.1} us ({gf:5.1} GFLOP/s)", t * 1e6);
        }
    }
    if on("prefill") {
        println!("\n== prefill matmul, 512 rows");
        for &(name, k, n) in &shapes {
            let w = bf16_matrix(n, k, 7);
            let x = acts(512 * k);
            let mut out = vec![0f32; 512 * n];
            let t = time(min, || matmul(&x, 512, &w, &mut out));
            println!(
                "{name:<22} {:8.2} ms  {:6.1} GFLOP/s",
                t * 1e3,
                2.0 * (512 * n * k) as f64 / t / 1e9
            );
        }
    }
    if on("attn") {
        println!("\n== attention (9 heads / 3 KV heads x 64), one layer, f32 KV");
        let shape = AttnShape {
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
        };
        let cap = 4096;
        // Paged: blocks of 16 in a scrambled order (stride 97 over 256 + 16 spare blocks);
        // contiguous: one block holding all 4096 positions (the old cache's layout).
        let bs = 16;
        let nb = cap / bs + 16;
        let table: Vec<u32> = (0..cap / bs).map(|i| ((i * 97) % nb) as u32).collect();
        let mut paged = CpuKvStore::new(1, nb, bs, shape);
        let mut contig = CpuKvStore::new(1, 1, cap, shape);
        let kv = acts(cap * shape.qkv_width());
        let slots: Vec<u32> = (0..cap)
            .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
            .collect();
        paged.store(0, &kv, cap, &slots);
        contig.store(0, &kv, cap, &(0..cap as u32).collect::<Vec<_>>());
        let run = |store: &CpuKvStore,
                   t: &[u32],
                   q: &[f32],
                   seqs: &[(usize, usize)],
                   out: &mut Vec<f32>| {
            let seqs: Vec<AttnSeq<'_>> = seqs
                .iter()
                .map(|&(rows, start_pos)| AttnSeq {
                    rows,
                    start_pos,
                    block_table: t,
                    policy: kvserve::kv::policy::KvPolicy::EXACT,
                })
                .collect();
            attention(q, &seqs, shape, store, 0, out, simd::avx2_fma());
        };
        for ctx in [128, 512, 1024, 2048, 4096] {
            let q = acts(shape.qkv_width());
            let mut out = vec![0f32; shape.q_width()];
            let tp = time(min / 3, || {
                run(&paged, &table, &q, &[(1, ctx - 1)], &mut out)
            });
            let tc = time(min / 3, || {
                run(&contig, &[0], &q, &[(1, ctx - 1)], &mut out)
            });
            let gb = |t: f64| (2 * ctx * shape.kv_width() * 4) as f64 / t / 1e9;
            println!(
                "decode ctx {ctx:>4}: paged {:7.1} us ({:5.1} GB/s)  contiguous {:7.1} us ({:5.1} GB/s)",
                tp * 1e6,
                gb(tp),
                tc * 1e6,
                gb(tc)
            );
        }
        // The same decode over sealed blocks: each policy's blocks decoded inside the loop.
        // Bytes read = the policy's sealed bytes (the own, exact block aside).
        println!("decode over sealed blocks (time, and bytes the cache holds per position):");
        for name in [
            "bf16",
            "int8",
            "k8v4",
            "kivi4",
            "kivi2",
            "kivi4+quest:512",
            "mhc:64",
            "mhc:64+kivi4",
        ] {
            let policy = kvserve::kv::policy::KvPolicy::parse(name).unwrap();
            let codec = policy.codec.unwrap();
            let mut sealed = CpuKvStore::new(1, nb, bs, shape);
            sealed.store(0, &kv, cap, &slots);
            if let Some(rank) = codec.latent_rank() {
                // A random projection: the cost depends on the shapes only.
                use kvserve::backend::latent::{LatentKeys, LatentLayer};
                let (w, r) = (shape.kv_width(), rank as usize);
                let keys = LatentKeys {
                    id: [0; 32],
                    rank,
                    kv_width: w,
                    head_dim: shape.head_dim,
                    layers: vec![LatentLayer {
                        rank: r,
                        mean: acts(w),
                        down: acts(r * w),
                        up_t: acts(r * w),
                    }],
                    rope: kvserve::backend::RopeParams {
                        inv_freq: (0..shape.head_dim / 2)
                            .map(|i| 1e5f32.powf(-(i as f32) / 32.0))
                            .collect(),
                        attention_scaling: 1.0,
                    },
                    max_positions: cap,
                };
                let table = kvserve::backend::cpu::ops::RopeTable::new(&keys.rope, cap);
                sealed.attach_latent(std::sync::Arc::new(keys), std::sync::Arc::new(table));
            }
            let seals: Vec<kvserve::backend::Seal> = table
                .iter()
                .enumerate()
                .map(|(i, &block)| kvserve::backend::Seal {
                    block,
                    pos: (i * bs) as u32,
                    codec,
                    bounds: policy.stores_bounds(),
                })
                .collect();
            sealed.seal(0, &seals);
            let per_pos = policy
                .sealed_bytes_per_block(1, shape.num_kv_heads, bs, shape.head_dim)
                .unwrap() as f64
                / bs as f64;
            let mut line = format!("  {name:<16} {per_pos:5.0} B/pos:");
            for ctx in [1024, 4096] {
                let q = acts(shape.qkv_width());
                let mut out = vec![0f32; shape.q_width()];
                let seqs = [AttnSeq {
                    rows: 1,
                    start_pos: ctx - 1,
                    block_table: &table,
                    policy,
                }];
                let t = time(min / 3, || {
                    attention(&q, &seqs, shape, &sealed, 0, &mut out, simd::avx2_fma())
                });
                line += &format!("  ctx {ctx} {:7.1} us", t * 1e6);
            }
            println!("{line}");
        }
        // 16 decode rows at once (all reading the same table: same bytes as 16 sequences).
        let q = acts(16 * shape.qkv_width());
        let mut out = vec![0f32; 16 * shape.q_width()];
        let seqs: Vec<(usize, usize)> = (0..16).map(|i| (1, 256 + 48 * i)).collect();
        let t = time(min / 3, || run(&paged, &table, &q, &seqs, &mut out));
        println!("decode batch of 16, ctx 257..977: {:7.1} us", t * 1e6);
        for rows in [512, 2048] {
            let q = acts(rows * shape.qkv_width());
            let mut out = vec![0f32; rows * shape.q_width()];
            let tp = time(min / 2, || run(&paged, &table, &q, &[(rows, 0)], &mut out));
            let tc = time(min / 2, || run(&contig, &[0], &q, &[(rows, 0)], &mut out));
            // QKᵀ and P·V, causal: rows(rows+1)/2 pairs per head, 2 flops per MAC.
            let flops = 2.0 * 2.0 * (rows * (rows + 1) / 2 * 9 * 64) as f64;
            println!(
                "prefill {rows} rows: paged {:7.2} ms ({:5.1} GFLOP/s)  contiguous {:7.2} ms ({:5.1} GFLOP/s)",
                tp * 1e3,
                flops / tp / 1e9,
                tc * 1e3,
                flops / tc / 1e9
            );
        }
    }
}
