//! `--device` on a machine without a usable GPU: `auto` runs on the CPU and says why, `cuda` is
//! a clear error, and nothing panics inside cudarc's loader. Covers both "no libcuda at all"
//! (a test-only library path with no driver in it) and "a driver with no device" (a fake
//! `libcuda.so.1` built here from a few lines of C whose `cuInit` returns
//! CUDA_ERROR_NO_DEVICE, put first on the library path).

mod common;

use common::{write_tiny_model, TinySpec};
use std::path::Path;
use std::process::{Command, Output};

const FAKE_LIBCUDA: &str = r#"
typedef int CUresult;
CUresult cuInit(unsigned int flags) { (void)flags; return 100; }
CUresult cuDeviceGetCount(int *n) { *n = 0; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; *s = "no CUDA-capable device is detected"; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
"#;

fn generate(model: &Path, device: &str, lib_path: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvserve"));
    cmd.args(["generate", "--device", device, "--model"])
        .arg(model)
        .args(["--prompt-ids", "1,2,3", "--max-tokens", "2", "--ignore-eos"]);
    if let Some(p) = lib_path {
        cmd.env("LD_LIBRARY_PATH", p);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Builds the fake driver as both `libcuda.so` and `libcuda.so.1` (cudarc tries both names).
fn fake_driver(dir: &Path) {
    let src = dir.join("fake_cuda.c");
    std::fs::write(&src, FAKE_LIBCUDA).unwrap();
    let so = dir.join("libcuda.so.1");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&src)
        .status()
        .expect("a C compiler (cc) to build the fake libcuda");
    assert!(st.success(), "building the fake libcuda failed");
    std::fs::copy(&so, dir.join("libcuda.so")).unwrap();
}

#[test]
fn auto_falls_back_to_cpu_and_cuda_is_a_clear_error_with_a_driver_but_no_device() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 3);
    let libs = dir.path().join("fakecuda");
    std::fs::create_dir(&libs).unwrap();
    fake_driver(&libs);

    let auto = generate(dir.path(), "auto", Some(&libs));
    assert!(auto.status.success(), "{}", stderr(&auto));
    let err = stderr(&auto);
    assert!(
        err.contains("device: cpu (no usable GPU: the CUDA driver did not initialise"),
        "{err}"
    );
    assert!(
        err.contains("NO_DEVICE") || err.contains("no CUDA-capable device"),
        "{err}"
    );
    assert!(err.contains("decode: 1 tokens"), "{err}");

    let cuda = generate(dir.path(), "cuda", Some(&libs));
    assert!(!cuda.status.success());
    let err = stderr(&cuda);
    assert!(err.contains("--device cuda:0: no usable GPU"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn without_a_driver_auto_runs_on_the_cpu_and_cpu_never_probes() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 4);
    // A library path with no libcuda in it: on a machine without a driver (CI) this is the
    // no-driver path; the reason is printed either way.
    let auto = generate(dir.path(), "auto", None);
    assert!(auto.status.success(), "{}", stderr(&auto));
    let err = stderr(&auto);
    assert!(err.contains("device: "), "{err}");
    if err.contains("device: cpu") {
        assert!(err.contains("no usable GPU: "), "{err}");
    }
    let cpu = generate(dir.path(), "cpu", None);
    assert!(cpu.status.success(), "{}", stderr(&cpu));
    assert!(
        stderr(&cpu).contains("device: cpu (--device cpu)"),
        "{}",
        stderr(&cpu)
    );

    let bad = generate(dir.path(), "tpu", None);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("expected auto, cpu, cuda or cuda:N"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn cuda_without_any_driver_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 5);
    let out = generate(dir.path(), "cuda:99", None);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("--device cuda:99: no usable GPU: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
