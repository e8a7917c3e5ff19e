//! The `start` section: how long the backend takes to start with its kernels compiled by NVRTC
//! and from the disk cache, which kernels spill registers under this machine's NVRTC, and what
//! `--device auto` picks.

use super::{measure, Row};
use anyhow::Result;
use kvserve::backend::cuda::{choose, compile, Choice, CudaBackend, DeviceArg, GpuInfo};
use std::time::{Duration, Instant};

/// The section's rows; `gpu` is the backend the section started, `started` how long that took.
pub fn run(
    gpu: &CudaBackend,
    info: &GpuInfo,
    started: Duration,
    rows: &mut Vec<Row>,
) -> Result<()> {
    rows.push(measure(
        "backend start, kernels compiled by NVRTC",
        started.as_secs_f64(),
        "s",
        &format!(
            "compile {:.2} s{}",
            gpu.compile_seconds,
            if gpu.compile_seconds == 0.0 {
                " (all from the disk cache: clear it for a compile time)"
            } else {
                ""
            }
        ),
    ));
    let t2 = Instant::now();
    let again = CudaBackend::new(info.clone())?;
    let cached = again.compile_seconds == 0.0;
    drop(again);
    rows.push(measure(
        "backend start again, kernels from the disk cache",
        t2.elapsed().as_secs_f64(),
        "s",
        if cached { "cache hit" } else { "cache MISS" },
    ));
    // ptxas's report from this machine's NVRTC: which kernels spill registers here (CI's
    // compile test reads a newer NVRTC's; tests/cuda_kernels_compile.rs ALLOWED_SPILLS).
    let t3 = Instant::now();
    let jobs = compile::Job::all(info.arch);
    let mut spilled: Vec<(String, usize)> = Vec::new();
    for c in compile::compile_files(&jobs, true, &[]) {
        for s in compile::spills(&c.map_err(anyhow::Error::msg)?.log) {
            if !spilled.contains(&s) {
                spilled.push(s);
            }
        }
    }
    let list: Vec<String> = spilled.iter().map(|(k, b)| format!("{k} {b} B")).collect();
    rows.push(measure(
        "kernels spilling registers (this NVRTC, ptxas report)",
        spilled.len() as f64,
        "kernels",
        &format!(
            "sm_{}, compiled again with -Xptxas=-v in {:.1} s: {}",
            info.arch,
            t3.elapsed().as_secs_f64(),
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        ),
    ));
    match choose(DeviceArg::Auto) {
        Ok(Choice::Cuda(i)) => {
            println!("--device auto picks cuda:{} ({})", i.ordinal, i.name)
        }
        Ok(Choice::Cpu { reason }) => println!("--device auto picks the CPU: {reason}"),
        Err(e) => println!("--device auto: {e}"),
    }
    Ok(())
}
