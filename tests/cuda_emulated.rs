//! The CUDA backend end to end without a GPU. g++ builds an emulated device
//! (`tests/cuda_host/emu_driver.cpp`): a `libcuda.so` / `libcublas.so` whose kernels are the
//! host builds of `kernels/*.cu` (CTA by CTA, every CUDA thread a fiber), device memory host
//! memory. `gpu_check --section "small model"` then runs in a child process with that library
//! first on its library path: `CudaBackend` starts as on a GPU (the real NVRTC compiles the real
//! kernels, the emulator takes the module and finds each entry point by name) and a small model
//! of the default's kind runs its whole forward pass under every published KV policy against the
//! CPU backend, then greedy generation through the engine on both. So every line of the
//! backend's host code (uploads, block tables, seals, quest, the few-row products, device argmax
//! and draws) runs together with the kernels it launches, which the per-kernel host tests
//! (`cuda_formats_host.rs`) cannot show. NVRTC is needed as for `cuda_kernels_compile.rs`.

#[path = "cuda_host/host_build.rs"]
mod host_build;

use kvserve::backend::cuda::kernels::kernel_names;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// g++ for the emulated device's units: position-independent, fibers instead of threads.
fn gxx(dir: &Path) -> Command {
    let mut c = host_build::gxx(dir);
    c.args(["-fPIC", "-DHOST_FIBERS", "-I"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_host"));
    c
}

/// The emulated device, built once per test process (see [`build_emulator`]).
fn emulator() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(build_emulator)
}

/// Builds the emulated device into a folder holding `libcuda.so` and `libcublas.so`:
/// `$KVSERVE_EMU_DIR` when set (for measurements with it: docs/cuda.md), else `emu` in the
/// tests' scratch folder, rebuilt by every run.
fn build_emulator() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = match std::env::var_os("KVSERVE_EMU_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_TARGET_TMPDIR")).join("emu"),
    };
    // Dynamic shared memory becomes an array of the file's namespace (below).
    host_build::host_kernels(&dir);
    // One translation unit per kernel file, in a namespace of its own, registering the entry
    // points the backend loads from it.
    let mut files: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (file, name) in kernel_names() {
        files.entry(file).or_default().push(name);
    }
    let mut units = vec![root.join("tests/cuda_host/emu_driver.cpp")];
    // The driver's stand-in GEMM is the one hot loop outside the kernels: optimised further.
    for (file, names) in &files {
        let ns = format!("emu_{}", file.trim_end_matches(".cu"));
        let regs: String = names
            .iter()
            .map(|n| format!("    {{\"{n}\", &emu::run<&{ns}::{n}>}},\n"))
            .collect();
        let unit = dir.join(format!("{ns}.cpp"));
        std::fs::write(
            &unit,
            format!(
                "#include \"shim.h\"\n#include \"emu.h\"\nnamespace {ns} {{\nfloat smem[1 << 18];\nfloat pre[1 << 18];\n#include \"{file}\"\n}}\nstatic const emu::Reg regs[] = {{\n{regs}}};\nstatic const bool registered = (emu::add(regs, sizeof regs / sizeof regs[0]), true);\n"
            ),
        )
        .unwrap();
        units.push(unit);
    }
    // Compile the units side by side, then link.
    let jobs: Vec<_> = units
        .iter()
        .map(|u| {
            let obj = dir.join(u.file_name().unwrap()).with_extension("o");
            let mut cmd = gxx(&dir);
            if u.ends_with("emu_driver.cpp") {
                cmd.arg("-O2"); // the last -O wins
            }
            let child = cmd
                .arg("-c")
                .arg(u)
                .arg("-o")
                .arg(&obj)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("g++ (C++20) is needed: {e}"));
            (u.clone(), obj, child)
        })
        .collect();
    let mut objs = Vec::new();
    for (unit, obj, child) in jobs {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}: build failed:\n{}",
            unit.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        objs.push(obj);
    }
    let lib = dir.join("libcuda.so");
    let out = gxx(&dir)
        .arg("-shared")
        .arg("-o")
        .arg(&lib)
        .args(&objs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "link failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::copy(&lib, dir.join("libcublas.so")).unwrap();
    dir
}

#[derive(serde::Deserialize, Debug)]
struct Row {
    name: String,
    value: f64,
    unit: String,
    pass: Option<bool>,
}

#[test]
fn the_cuda_backend_runs_a_small_model_on_the_emulated_device_like_the_cpu() {
    if !host_build::nvrtc_or_fail("the emulated-device test") {
        return;
    }
    let dir = emulator();
    let rows_file = dir.join("rows.json");
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emu-kernel-cache");
    let t = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_gpu_check"))
        // Chunks of 32 KiB (one exact block, two kivi4 ones): the blocks the pool frees leave
        // chunks sparsely used, so the store's compaction has work.
        .args([
            "--section",
            "small model",
            "--kv-chunk-bytes",
            "32768",
            "--rows-out",
        ])
        .arg(&rows_file)
        .env("LD_LIBRARY_PATH", dir)
        .env_remove("KVSERVE_CUBLAS_LIB")
        .env("KVSERVE_CUDA_CACHE", &cache)
        .output()
        .unwrap();
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{log}\n(section ran {:.1} s)", t.elapsed().as_secs_f64());
    assert!(
        out.status.success(),
        "gpu_check failed on the emulated device"
    );
    let rows: Vec<Row> = serde_json::from_slice(&std::fs::read(&rows_file).unwrap()).unwrap();
    // The emulated device is the one the backend opened.
    assert!(log.contains("emulated device"), "{log}");
    let forward: Vec<&Row> = rows.iter().filter(|r| r.name.contains("forward")).collect();
    // exact, 5 formats, 2 windows, 2 quests, 4 mhc.
    assert_eq!(forward.len(), 14, "{rows:#?}");
    for r in &rows {
        assert_ne!(r.pass, Some(false), "{r:#?}");
    }
    for r in &forward {
        assert_eq!(r.unit, "max rel err");
        assert!(r.value <= 1e-2, "{r:#?}");
    }
    // Greedy streams through the engine: the same tokens on both backends, with room for all
    // and on a pool where blocks are evicted, forgotten and their slots compacted.
    let streams: Vec<&Row> = rows.iter().filter(|r| r.name.contains("streams")).collect();
    assert_eq!(streams.len(), 3, "{rows:#?}");
    for r in streams {
        assert_eq!(r.value, 4.0, "{r:#?}");
    }
    let compacted = rows
        .iter()
        .find(|r| r.name.contains("slabs compacted, then decoded"));
    assert!(compacted.is_some_and(|r| r.pass == Some(true)), "{rows:#?}");
    let moved = rows
        .iter()
        .find(|r| r.name.contains("moved by slab compaction"));
    assert!(moved.is_some_and(|r| r.value > 0.0), "{rows:#?}");
}

/// The product's own path on the emulated device: `kvserve generate --device cuda` on the real
/// default model (the GGUF, its tokenizer and chat template) writes the CPU's greedy text.
#[test]
fn the_default_model_writes_the_cpus_text_on_the_emulated_device() {
    if !host_build::nvrtc_or_fail("the emulated-device test") {
        return;
    }
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.exists(),
        "{}: run scripts/fetch-model.sh",
        model.display()
    );
    let dir = emulator();
    let run = |device: &str| {
        let t = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_kvserve"))
            .args([
                "generate",
                "--device",
                device,
                "--chat",
                "--max-tokens",
                "8",
                // The device widens quantized weights to bf16: the CPU oracle holds the same.
                "--weights",
                "bf16",
                "--model",
            ])
            .arg(&model)
            .args(["--prompt", "What is the capital of France?"])
            .env("LD_LIBRARY_PATH", dir)
            .env_remove("KVSERVE_CUBLAS_LIB")
            .env(
                "KVSERVE_CUDA_CACHE",
                Path::new(env!("CARGO_TARGET_TMPDIR")).join("emu-kernel-cache"),
            )
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        eprintln!(
            "--device {device} ({:.1} s):\n{stdout}\n{stderr}",
            t.elapsed().as_secs_f64()
        );
        assert!(out.status.success(), "--device {device} failed");
        (stdout, stderr)
    };
    let (cpu, _) = run("cpu");
    let (gpu, log) = run("cuda");
    assert!(log.contains("kvserve emulated device"), "{log}");
    assert!(!cpu.trim().is_empty());
    assert_eq!(gpu, cpu);
}

/// Memory of the emulated device in the server tests: 2 GiB.
const EMU_MEM: &str = "2147483648";

/// `kvserve serve --device <device> <extra>` on the default model on a free port, on an
/// emulated device of [`EMU_MEM`] bytes, its stdout and stderr piped.
fn spawn_server(device: &str, dir: &Path, extra: &[&str]) -> std::process::Child {
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    Command::new(env!("CARGO_BIN_EXE_kvserve"))
        .args([
            "serve",
            "--device",
            device,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            // The device widens quantized weights to bf16: the CPU oracle holds the same.
            "--weights",
            "bf16",
            "--model",
        ])
        .arg(&model)
        .args(extra)
        .env("LD_LIBRARY_PATH", dir)
        .env("KVSERVE_EMU_MEM_BYTES", EMU_MEM)
        .env_remove("KVSERVE_CUBLAS_LIB")
        .env(
            "KVSERVE_CUDA_CACHE",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("emu-kernel-cache"),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// One chat completion from `kvserve serve --device <device>` on the default model: starts the
/// server on a free port, reads its address from the line it prints, posts the request over a
/// plain HTTP/1.1 connection and stops it. Returns the reply's text and the server's log.
fn serve_once(device: &str, dir: &Path) -> (String, String) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = spawn_server(device, dir, &[]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server ended before listening")
            .unwrap();
        if let Some(a) = line.strip_prefix("kvserve: listening on http://") {
            break a.trim().to_string();
        }
    };
    let body = r#"{"messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":8,"temperature":0}"#;
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    child.kill().ok();
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).ok();
    child.wait().ok();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}\n{log}");
    let json = &reply[reply.find("\r\n\r\n").expect("a body") + 4..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("a reply")
        .to_string();
    (text, log)
}

/// The HTTP path on the emulated device: `kvserve serve --device cuda` answers a chat completion
/// with the CPU server's very text.
#[test]
fn the_server_answers_with_the_cpus_text_on_the_emulated_device() {
    if !host_build::nvrtc_or_fail("the emulated-device test") {
        return;
    }
    let dir = emulator();
    let (cpu, _) = serve_once("cpu", dir);
    let (gpu, log) = serve_once("cuda", dir);
    eprintln!("cpu: {cpu:?}\ncuda: {gpu:?}");
    assert!(log.contains("kvserve emulated device"), "{log}");
    assert!(!cpu.trim().is_empty());
    assert_eq!(gpu, cpu);
    // The pool was sized to the device, not to the host: 0.9 of its 2 GiB less the weights
    // (~0.27 GiB as bf16) and a step's working memory.
    let line = log
        .lines()
        .find(|l| l.contains("KV pool") && l.contains("of the device's 2.00 GiB"))
        .unwrap_or_else(|| panic!("no device KV pool line:\n{log}"));
    let gib: f64 = line
        .split("KV pool ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1.0..1.6).contains(&gib), "{line}");
}

/// A KV pool that cannot fit on the device is refused at start with a message that says why,
/// instead of failing requests with out-of-memory errors once it fills.
#[test]
fn a_kv_pool_larger_than_the_device_is_refused_at_start() {
    use std::io::Read;
    if !host_build::nvrtc_or_fail("the emulated-device test") {
        return;
    }
    let dir = emulator();
    let mut child = spawn_server("cuda", dir, &["--kv-cache-bytes", "3000000000"]);
    let status = child.wait().unwrap();
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).ok();
    assert!(!status.success(), "{log}");
    assert!(log.contains("kv.cache_bytes = 3000000000"), "{log}");
    assert!(log.contains("does not fit on the device"), "{log}");
    // Utilization out of range is a config error before anything loads.
    let mut child = spawn_server("cuda", dir, &["--gpu-memory-utilization", "1.5"]);
    let status = child.wait().unwrap();
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).ok();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("kv.gpu_memory_utilization must be in (0, 1]"),
        "{log}"
    );
}

/// The emulated device's memory faults where a GPU's memcheck would report: a read past the end
/// of a buffer (beyond its rounding to 256 bytes) and a write to a freed buffer each stop the
/// process with a report naming the buffer, and the last byte inside the rounding is readable
/// (and unwritten: 0xFF). Without this, such an access by a kernel read a neighbour's bytes.
#[test]
fn the_emulated_device_faults_on_access_past_a_buffer_or_after_free() {
    let dir = emulator();
    let bin = dir.join("emu_guard");
    let out = gxx(dir)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_host/emu_guard.cpp"))
        .arg("-o")
        .arg(&bin)
        .arg("-L")
        .arg(dir)
        .arg("-lcuda")
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = |case: &str| Command::new(&bin).arg(case).output().unwrap();
    let inside = run("inside");
    assert!(inside.status.success(), "{inside:?}");
    assert_eq!(String::from_utf8_lossy(&inside.stdout).trim(), "255");
    for (case, report) in [
        ("past", "1024 bytes from the start of a 1024-byte buffer"),
        (
            "freed",
            "8 bytes from the start of a freed 1024-byte buffer",
        ),
    ] {
        let out = run(case);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{case}: ran on ({err})");
        assert!(err.contains(report), "{case}: {err}");
    }
}
