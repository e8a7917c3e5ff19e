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

use kvserve::backend::cuda::device::nvrtc_present;
use kvserve::backend::cuda::kernels::kernel_names;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn nvrtc_or_fail() -> bool {
    if nvrtc_present() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "CI=true but NVRTC cannot be loaded: set KVSERVE_NVRTC_LIB (see .ci/run)"
    );
    eprintln!("NVRTC not found (set KVSERVE_NVRTC_LIB); emulated-device test not run outside CI");
    false
}

fn gxx(dir: &Path) -> Command {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let mut c = Command::new(cxx);
    c.args([
        "-std=c++20",
        "-O1",
        "-fPIC",
        "-ffp-contract=off",
        "-fno-strict-aliasing",
        "-DHOST_FIBERS",
        "-pthread",
    ])
    .arg("-I")
    .arg(dir)
    .arg("-I")
    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_host"));
    c
}

/// Builds the emulated device into a fresh folder holding `libcuda.so` and `libcublas.so`:
/// `$KVSERVE_EMU_DIR` when set (kept after the test, for measurements: docs/cuda.md), else a
/// folder of this run, removed when the test passes.
fn build_emulator() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = match std::env::var_os("KVSERVE_EMU_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("emu-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(root.join("kernels")).unwrap() {
        let path = entry.unwrap().path();
        let src = std::fs::read_to_string(&path).unwrap();
        // Dynamic shared memory becomes an array of the file's namespace (below).
        let host = src.replace("extern __shared__", "extern");
        std::fs::write(dir.join(path.file_name().unwrap()), host).unwrap();
    }
    // One translation unit per kernel file, in a namespace of its own, registering the entry
    // points the backend loads from it.
    let mut files: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (file, name) in kernel_names() {
        files.entry(file).or_default().push(name);
    }
    let mut units = vec![root.join("tests/cuda_host/emu_driver.cpp")];
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
            let child = gxx(&dir)
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
    if !nvrtc_or_fail() {
        return;
    }
    let dir = build_emulator();
    let rows_file = dir.join("rows.json");
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emu-kernel-cache");
    let t = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_gpu_check"))
        .args(["--section", "small model", "--rows-out"])
        .arg(&rows_file)
        .env("LD_LIBRARY_PATH", &dir)
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
    // Greedy streams through the engine: the same tokens on both backends.
    let streams: Vec<&Row> = rows.iter().filter(|r| r.name.contains("streams")).collect();
    assert_eq!(streams.len(), 2, "{rows:#?}");
    for r in streams {
        assert_eq!(r.value, 4.0, "{r:#?}");
    }
    if std::env::var_os("KVSERVE_EMU_DIR").is_none() {
        std::fs::remove_dir_all(&dir).ok();
    }
}
