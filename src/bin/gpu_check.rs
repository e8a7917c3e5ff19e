//! GPU verification in one run (issue 9): parity of every CUDA op and of the whole forward pass
//! against the CPU backend (the oracle) on random inputs and a random-weight 1B-shaped Llama,
//! then speed: paged decode attention bandwidth against a device-to-device copy, the few-row
//! products against cuBLAS, token selection on the device against reading the rows, and engine
//! output tokens/s at batch 1, 32 and 128 (greedy; 32 and 128 again at temperature 1, 128 also
//! drawn on the host; 1 and 8 with and without the few-row products), and the default model
//! (SmolLM2-135M: real weights when its GGUF is at hand) under every published KV policy, its
//! engine streams against the CPU's and its tokens/s. Writes
//! `gpu-check.json` and `gpu-check.md` into `--out`. Exit status 1 when any parity check fails.
//!
//! Each section runs in a child process of its own (a kernel fault ends only its section) with
//! a time limit (`--section-timeout`, 120 s).
//!
//! Usage: `gpu_check [--out DIR] [--device N] [--skip-engine] [--model GGUF]` (see
//! scripts/gpu-check.sh).

#[path = "gpu_check/engine_speed.rs"]
mod engine_speed;
#[path = "gpu_check/isolate.rs"]
mod isolate;
#[path = "gpu_check/model.rs"]
mod model;
#[path = "gpu_check/ops.rs"]
mod ops;
#[path = "gpu_check/policies.rs"]
mod policies;
#[path = "gpu_check/speed.rs"]
mod speed;
#[path = "gpu_check/split_sweep.rs"]
mod split_sweep;
#[path = "gpu_check/start.rs"]
mod start;
#[path = "gpu_check/step_anatomy.rs"]
mod step_anatomy;
#[path = "gpu_check/streams.rs"]
mod streams;
#[path = "bench_common/token_times.rs"]
mod token_times;
#[path = "gpu_check/verdict.rs"]
mod verdict;

use anyhow::{Context, Result};
use clap::Parser;
use kvserve::backend::cpu::CpuBackend;
use kvserve::backend::cuda::parity::{llama_config, max_rel_err, RandomWeights};
use kvserve::backend::cuda::{probe, CudaBackend, GpuInfo};
use kvserve::model::config::ModelConfig;
use kvserve::model::llama::{Llama, LogitsFor, SeqStep};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest relative error a bf16 check may show.
pub const TOL: f64 = 1e-2;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = ".")]
    out: std::path::PathBuf,
    #[arg(long, default_value_t = 0)]
    device: usize,
    #[arg(long)]
    skip_engine: bool,
    /// The default model's GGUF for the "default model" section (default: SmolLM2-135M-Instruct.Q4_1.gguf
    /// next to this binary or under models/; random weights of its shape when there is none).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Only the copy and decode-attention bandwidth section, in this process (for profilers).
    #[arg(long)]
    only_bandwidth: bool,
    /// Run one section in this process and write its rows as JSON to `--rows-out` (how the
    /// parent runs each section): start, op parity, attention parity, KV policy parity, decode
    /// bandwidth, products, forward parity, engine, default model, default model shape, small model (also what
    /// tests/cuda_emulated.rs runs on the emulated device).
    #[arg(long, requires = "rows_out")]
    section: Option<String>,
    #[arg(long)]
    rows_out: Option<std::path::PathBuf>,
    /// Seconds a section may run before it is killed and recorded as failed.
    #[arg(long, default_value_t = 120)]
    section_timeout: u64,
    /// The engine section runs only greedy batches of these sizes (e.g. `1,32,128`) instead of
    /// its own cases: for host-cost measurements on the emulated device (docs/cuda.md).
    #[arg(long, value_delimiter = ',')]
    engine_batches: Vec<usize>,
    /// Device memory per KV chunk (default ~8 MiB): small chunks give the stores' slab
    /// compaction work at small pools (tests/cuda_emulated.rs).
    #[arg(long)]
    kv_chunk_bytes: Option<usize>,
}

/// The sections, in order. Each runs in a child process of its own: a kernel fault (an illegal
/// address, a trap) leaves a CUDA context unusable for good, so in one process it would take
/// every later measurement with it; as a child, it costs only its own rows. The first section
/// compiles the kernels, the later ones load them from the disk cache.
const SECTIONS: [&str; 11] = [
    "start",
    "op parity",
    "attention parity",
    "KV policy parity",
    "decode bandwidth",
    "products",
    "forward parity",
    "engine",
    "default model",
    "default model shape",
    "small model",
];

/// One result line: a parity check (error) or a measurement (value + unit).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// `Some(pass)` for parity checks.
    pub pass: Option<bool>,
    pub note: String,
}

pub fn parity(name: &str, got: &[f32], want: &[f32], note: &str) -> Row {
    error_row(name, max_rel_err(got, want), note)
}

/// A parity row for an error already measured: passes within [`TOL`].
pub fn error_row(name: &str, e: f64, note: &str) -> Row {
    judged_row(name, e, e <= TOL, note)
}

/// A parity row for an error judged by its own rule.
pub fn judged_row(name: &str, e: f64, pass: bool, note: &str) -> Row {
    println!(
        "{:<44} {:>10.3e}  {}  {note}",
        name,
        e,
        if pass { "PASS" } else { "FAIL" }
    );
    Row {
        name: name.into(),
        value: e,
        unit: "max rel err".into(),
        pass: Some(pass),
        note: note.into(),
    }
}

pub fn measure(name: &str, value: f64, unit: &'static str, note: &str) -> Row {
    if unit == "max rel err" {
        println!("{:<44} {:>10.3e} {unit}  {note}", name, value);
    } else {
        println!("{:<44} {:>10.1} {unit}  {note}", name, value);
    }
    Row {
        name: name.into(),
        value,
        unit: unit.into(),
        pass: None,
        note: note.into(),
    }
}

/// Runs one part of a section; an error or a panic (a CUDA error inside an op) becomes a failed
/// row, and the rest of the section still runs when the error left the context usable (a
/// launch error does; a kernel fault does not, which is why each section has a process).
fn section(name: &str, rows: &mut Vec<Row>, f: impl FnOnce(&mut Vec<Row>) -> Result<()>) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut *rows)));
    let msg = match r {
        Ok(Ok(())) => return,
        Ok(Err(e)) => format!("{e:#}"),
        Err(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into()),
    };
    println!("SECTION FAILED: {name}: {msg}");
    rows.push(failed_section(name, msg));
}

fn failed_section(name: &str, msg: String) -> Row {
    Row {
        name: format!("{name} (section)"),
        value: f64::INFINITY,
        unit: "max rel err".into(),
        pass: Some(false),
        note: msg,
    }
}

/// The 1B-like shape of the issue: 16 layers, hidden 2048, 32 q / 8 kv heads of 64, MLP 8192.
pub fn one_b() -> ModelConfig {
    llama_config(32_000, 2048, 8192, 16, 32, 8, 64)
}

/// Whole-forward parity on the 1B shape: two prompts in one batch, then decode steps of both,
/// the CPU's greedy tokens fed to both backends; the logits of every step compared.
fn forward_parity(gpu: CudaBackend, rows: &mut Vec<Row>) -> Result<Llama<CudaBackend>> {
    let cfg = one_b();
    let t = Instant::now();
    let weights = RandomWeights::new(&cfg, 42);
    let cpu = Llama::load(cfg.clone(), &weights, CpuBackend::new())?;
    let dev = Llama::load(cfg.clone(), &weights, gpu)?;
    drop(weights);
    println!(
        "1B random-weight model built and loaded twice in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (mut s_cpu, mut s_dev) = (cpu.new_kv_store(64, 16), dev.new_kv_store(64, 16));
    let tables: [Vec<u32>; 2] = [(0..16).rev().collect(), (16..64).step_by(2).collect()];
    let mut toks: [Vec<u32>; 2] = [
        (0..77).map(|i| (i * 7919 + 13) % 32_000).collect(),
        (0..33).map(|i| (i * 104_729 + 5) % 32_000).collect(),
    ];
    let mut worst = 0f64;
    let mut worst_plain = None;
    for step in 0..6 {
        let batch: Vec<SeqStep<'_>> = (0..2)
            .map(|s| {
                let start = if step == 0 { 0 } else { toks[s].len() - 1 };
                SeqStep {
                    policy: kvserve::kv::policy::KvPolicy::EXACT,
                    tokens: &toks[s][start..],
                    start_pos: start,
                    block_table: &tables[s],
                    logits: if step == 0 {
                        LogitsFor::All
                    } else {
                        LogitsFor::Last
                    },
                }
            })
            .collect();
        let want = cpu.forward(&batch, &mut s_cpu)?;
        let got = dev.forward(&batch, &mut s_dev)?;
        for s in 0..2 {
            let e = max_rel_err(&got[s], &want[s]);
            worst = worst.max(e);
            println!(
                "  forward step {step} seq {s}: {} logits, max rel err {e:.3e}",
                want[s].len()
            );
        }
        if step == 0 {
            // The same prompt step with plain bf16 activations (no hi/lo split), for the record.
            dev.backend().set_split_matmul(false);
            let mut scratch = dev.new_kv_store(64, 16);
            let plain = dev.forward(&batch, &mut scratch)?;
            dev.backend().set_split_matmul(true);
            let e = (0..2)
                .map(|s| max_rel_err(&plain[s], &want[s]))
                .fold(0f64, f64::max);
            worst_plain = Some(e);
        }
        let next: Vec<u32> = (0..2)
            .map(|s| {
                let v = cfg.vocab_size;
                let last = &want[s][want[s].len() - v..];
                (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as u32
            })
            .collect();
        drop(batch);
        for s in 0..2 {
            toks[s].push(next[s]);
        }
    }
    rows.push(error_row(
        "forward 1B (prompts 77+33, 5 decode steps)",
        worst,
        "logits, worst step",
    ));
    if let Some(e) = worst_plain {
        rows.push(measure(
            "forward 1B prompt step, plain bf16 activations",
            e,
            "max rel err",
            "informational",
        ));
    }
    Ok(dev)
}

/// Runs section `name` on device `info` in this process (see [`SECTIONS`]).
fn run_section(name: &str, info: &GpuInfo, args: &Args, rows: &mut Vec<Row>) -> Result<()> {
    let gguf = args.model.as_deref();
    let t = Instant::now();
    let gpu = CudaBackend::new(info.clone())?;
    if let Some(bytes) = args.kv_chunk_bytes {
        gpu.set_kv_chunk_bytes(bytes);
    }
    println!(
        "backend up on {} in {:.2} s (kernel compile {:.2} s, {} SMs)",
        info.name,
        t.elapsed().as_secs_f64(),
        gpu.compile_seconds,
        gpu.multiprocessors()
    );
    match name {
        "start" => start::run(&gpu, info, t.elapsed(), rows)?,
        "op parity" => section(name, rows, |rows| ops::run(&gpu, rows)),
        "attention parity" => section(name, rows, |rows| {
            ops::attention(&gpu, rows);
            Ok(())
        }),
        "KV policy parity" => section(name, rows, |rows| {
            policies::run(&gpu, rows, true);
            policies::run(&gpu, rows, false);
            Ok(())
        }),
        "decode bandwidth" => section(name, rows, |rows| {
            speed::bandwidth(&gpu, &speed::DECODE_VARIANTS, rows)
        }),
        "products" => section(name, rows, |rows| speed::products(&gpu, rows)),
        "forward parity" => section(name, rows, |rows| forward_parity(gpu, rows).map(drop)),
        "engine" => section(name, rows, |rows| {
            let cfg = one_b();
            let weights = RandomWeights::new(&cfg, 42);
            let model = Llama::load(cfg, &weights, gpu)?;
            drop(weights);
            let only: Vec<engine_speed::Case> = args
                .engine_batches
                .iter()
                .map(|&n| (n, 0.0, None, false))
                .collect();
            let cases = if only.is_empty() {
                &engine_speed::ONE_B_CASES[..]
            } else {
                &only[..]
            };
            let model = Arc::new(model);
            engine_speed::engine(model.clone(), "", cases, rows)?;
            step_anatomy::run(&model, rows)
        }),
        "default model" => section(name, rows, |rows| {
            let t = Instant::now();
            let gguf = model::find_gguf(gguf)?;
            let pair = model::Pair::load(gpu, gguf.as_deref())?;
            println!(
                "default model ({}) loaded on both backends in {:.1} s",
                pair.weights,
                t.elapsed().as_secs_f64()
            );
            let dev = model::run(pair, "default model", rows)?;
            rows.push(kv_moves_row("default model", dev.backend()));
            // What `kvserve serve --device cuda` serves by default, at batch 1, 32 and 128.
            let cases = [
                (1, 0.0, None, false),
                (32, 0.0, None, false),
                (128, 0.0, None, false),
                (128, 1.0, None, false),
            ];
            engine_speed::engine(dev, "default model ", &cases, rows)
        }),
        // The default model's shape (30 layers, hidden 576, a query group of 3) with random
        // weights: every policy's whole forward pass at a realistic depth, without the real
        // weights' outlier channels.
        "default model shape" => section(name, rows, |rows| {
            let pair = model::Pair::random(gpu, model::smollm2_shape(), 135)?;
            model::forward_rows(&pair, "default model shape", rows).map(drop)
        }),
        "small model" => section(name, rows, |rows| {
            let pair = model::Pair::random(gpu, model::small_shape(), 7)?;
            let dev = model::run(pair, "small model", rows)?;
            rows.push(kv_moves_row("small model", dev.backend()));
            Ok(())
        }),
        other => anyhow::bail!("unknown section {other:?}; sections: {SECTIONS:?}"),
    }
    Ok(())
}

/// How many KV blocks the section's stores moved to free sparsely used chunks (the engine
/// streams on a tight pool are where it happens).
fn kv_moves_row(label: &str, gpu: &CudaBackend) -> Row {
    measure(
        &format!("{label} KV blocks moved by slab compaction"),
        gpu.kv_blocks_moved() as f64,
        "blocks",
        "slots of blocks moved down so emptied chunks could be freed; the streams above ran through them",
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let info = probe(args.device)
        .map_err(anyhow::Error::msg)
        .context("no usable GPU")?;
    if let (Some(name), Some(out)) = (&args.section, &args.rows_out) {
        let mut rows = Vec::new();
        let r = run_section(name, &info, &args, &mut rows);
        std::fs::write(out, serde_json::to_vec(&rows)?)?;
        return r;
    }
    println!(
        "device cuda:{}: {} sm_{} driver {} memory {:.1} GiB",
        info.ordinal,
        info.name,
        info.arch,
        info.driver,
        info.total_mem as f64 / (1u64 << 30) as f64
    );
    let mut rows = Vec::new();
    if args.only_bandwidth {
        let gpu = CudaBackend::new(info.clone())?;
        return speed::bandwidth(&gpu, &[], &mut rows);
    }
    let timeout = Duration::from_secs(args.section_timeout);
    for name in SECTIONS {
        if name == "engine" && args.skip_engine {
            continue;
        }
        println!("\n== {name}");
        rows.extend(isolate::run_child(
            args.device,
            name,
            timeout,
            args.model.as_deref(),
        ));
    }

    let failed: Vec<&Row> = rows.iter().filter(|r| r.pass == Some(false)).collect();
    let mut md = String::new();
    writeln!(
        md,
        "device: cuda:{} {} (sm_{}, driver {})\n",
        info.ordinal, info.name, info.arch, info.driver
    )?;
    writeln!(
        md,
        "| check | value | unit | result | note |\n| --- | ---: | --- | --- | --- |"
    )?;
    for r in &rows {
        let res = match r.pass {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "",
        };
        let v = if r.unit == "max rel err" {
            format!("{:.2e}", r.value)
        } else {
            format!("{:.1}", r.value)
        };
        writeln!(md, "| {} | {v} | {} | {res} | {} |", r.name, r.unit, r.note)?;
    }
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("gpu-check.md"), &md)?;
    let json = serde_json::json!({ "device": info.name, "arch": info.arch, "driver": info.driver, "rows": rows });
    std::fs::write(
        args.out.join("gpu-check.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("\n{md}");
    if !failed.is_empty() {
        anyhow::bail!("{} parity check(s) failed", failed.len());
    }
    Ok(())
}
