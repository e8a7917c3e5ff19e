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
/// emulated device of [`EMU_MEM`] bytes with `env` set, its stdout and stderr piped.
fn spawn_server(
    device: &str,
    dir: &Path,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> std::process::Child {
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
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The chat completion the server tests post: greedy, 8 tokens.
const CHAT: &str = r#"{"messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":8,"temperature":0}"#;

/// The address a spawned server prints once it listens.
fn listening_address(child: &mut std::process::Child) -> String {
    use std::io::{BufRead, BufReader};
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines
            .next()
            .expect("the server ended before listening")
            .unwrap();
        if let Some(a) = line.strip_prefix("kvserve: listening on http://") {
            // Keep reading, so that the server never writes into a closed pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return a.trim().to_string();
        }
    }
}

/// One request over a plain HTTP/1.1 connection (`body` empty: none); the whole raw reply.
fn http(addr: &str, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    reply
}

/// One chat completion from `kvserve serve --device <device>` on the default model: starts the
/// server on a free port, reads its address from the line it prints, posts the request over a
/// plain HTTP/1.1 connection and stops it. Returns the reply's text and the server's log.
fn serve_once(device: &str, dir: &Path) -> (String, String) {
    use std::io::Read;
    let mut child = spawn_server(device, dir, &[], &[]);
    let addr = listening_address(&mut child);
    let reply = http(&addr, "POST", "/v1/chat/completions", CHAT);
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

/// A lost device (a kernel's illegal address: a sticky error, every later call fails) stops the
/// engine for good, and the server says so instead of failing request after request while
/// reporting itself healthy: see [`engine_failure`].
#[test]
fn a_lost_device_fails_requests_and_health_then_the_server_exits() {
    engine_failure(
        "KVSERVE_EMU_LOSE_DEVICE_WHEN",
        "",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
    );
}

/// A device that stops answering (a launch that never returns) is caught by the step watchdog
/// (`engine.step_timeout_secs`, 3 s here) and ends the same way: see [`engine_failure`].
#[test]
fn a_hung_device_trips_the_step_watchdog_then_the_server_exits() {
    engine_failure(
        "KVSERVE_EMU_HANG_WHEN",
        "[engine]\nstep_timeout_secs = 3\n",
        "past engine.step_timeout_secs = 3",
    );
}

/// Serves one request on the emulated device, then makes it fail through `trigger` (the
/// emulator's environment variable naming a file whose appearance faults the next launch) and
/// checks the server's answer: the request in flight and every later one get 503
/// `engine_failed`, `/health` and `/ready` answer 503 `failed`, the metrics show
/// `kvserve_engine_healthy 0`, the log (and no reply) names the cause (`cause`), and after
/// `server.failure_exit_secs` the process exits with status 1 for its supervisor to restart
/// it. `config` is added to the server's config file.
fn engine_failure(trigger: &str, config: &str, cause: &str) {
    use std::io::Read;
    if !host_build::nvrtc_or_fail("the emulated-device test") {
        return;
    }
    const GRACE_SECS: u64 = 10;
    let dir = emulator();
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join(trigger);
    std::fs::create_dir_all(&tmp).unwrap();
    let (file, config_file) = (tmp.join("now"), tmp.join("server.toml"));
    std::fs::remove_file(&file).ok();
    std::fs::write(
        &config_file,
        format!("[server]\nfailure_exit_secs = {GRACE_SECS}\n{config}"),
    )
    .unwrap();
    let mut child = spawn_server(
        "cuda",
        dir,
        &["--config", config_file.to_str().unwrap()],
        &[(trigger, &file)],
    );
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut log = String::new();
        stderr.read_to_string(&mut log).ok();
        log
    });
    let addr = listening_address(&mut child);
    // Served before the fault.
    let before = http(&addr, "POST", "/v1/chat/completions", CHAT);
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    assert!(http(&addr, "GET", "/health", "").starts_with("HTTP/1.1 200"));
    std::fs::write(&file, "").unwrap();
    let t = std::time::Instant::now();
    let failed = http(&addr, "POST", "/v1/chat/completions", CHAT);
    let failed_in = t.elapsed();
    let refused = http(&addr, "POST", "/v1/chat/completions", CHAT);
    let health = http(&addr, "GET", "/health", "");
    let ready = http(&addr, "GET", "/ready", "");
    let metrics = http(&addr, "GET", "/metrics", "");
    let answered_in = t.elapsed();
    let status = child.wait().unwrap();
    let exited_in = t.elapsed();
    let log = log.join().unwrap();
    let replies = format!("{failed}\n{refused}\n{health}\n{ready}");
    let ctx = format!("{replies}\n--- server log:\n{log}");
    eprintln!(
        "{ctx}\n--- {trigger}: failed in {failed_in:?}, all answered in {answered_in:?}, \
         exited after {exited_in:?}"
    );
    assert!(
        answered_in.as_secs() < GRACE_SECS,
        "the checks took {answered_in:?}: {ctx}"
    );
    for reply in [&failed, &refused] {
        assert!(reply.starts_with("HTTP/1.1 503"), "{ctx}");
        assert!(
            reply.to_ascii_lowercase().contains("retry-after: 5"),
            "{ctx}"
        );
        let json = &reply[reply.find("\r\n\r\n").expect("a body") + 4..];
        let v: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {ctx}"));
        assert_eq!(v["error"]["code"], "engine_failed", "{ctx}");
        assert_eq!(v["error"]["type"], "server_error", "{ctx}");
    }
    for reply in [&health, &ready] {
        assert!(reply.starts_with("HTTP/1.1 503"), "{ctx}");
        assert!(reply.contains(r#"{"status":"failed"}"#), "{ctx}");
    }
    assert!(
        metrics.contains("\nkvserve_engine_healthy 0\n"),
        "{metrics}"
    );
    // The request that failed in flight and the one refused after it.
    let refusals = metrics.lines().find(|l| {
        l.starts_with("kvserve_request_rejections_total{")
            && l.contains(r#"reason="engine_failed""#)
            && l.contains(r#"tenant="default""#)
    });
    assert!(
        refusals.is_some_and(|l| l.ends_with("} 2")),
        "{refusals:?}\n{metrics}"
    );
    // The cause is in the log and in no reply; the process exits 1 after the grace.
    assert!(log.contains(cause), "{ctx}");
    assert!(!replies.contains(cause), "{ctx}");
    assert!(log.contains("exiting with status 1"), "{ctx}");
    assert_eq!(status.code(), Some(1), "{ctx}");
    assert!(
        exited_in.as_secs() >= GRACE_SECS && exited_in.as_secs() < GRACE_SECS + 30,
        "exited after {exited_in:?}: {ctx}"
    );
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
    let mut child = spawn_server("cuda", dir, &["--kv-cache-bytes", "3000000000"], &[]);
    let status = child.wait().unwrap();
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).ok();
    assert!(!status.success(), "{log}");
    assert!(log.contains("kv.cache_bytes = 3000000000"), "{log}");
    assert!(log.contains("does not fit on the device"), "{log}");
    // Utilization out of range is a config error before anything loads.
    let mut child = spawn_server("cuda", dir, &["--gpu-memory-utilization", "1.5"], &[]);
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
