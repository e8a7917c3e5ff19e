//! Running the host builds of `kernels/*.cu` from the tests that check them against the CPU
//! backend (`cuda_formats_host.rs`, `cuda_attention_host.rs`, `cuda_ops_host.rs`): building a
//! harness of `tests/cuda_host/`, calling it on a byte input, and the little-endian bytes in
//! between. Each test binary uses part of it.
#![allow(dead_code)]

use super::host_build;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds a harness (`tests/cuda_host/<cpp>`, which includes the kernel files it runs) once per
/// test process, into `host-kernels-<test binary>` in the tests' scratch folder (rebuilt by every run, as the
/// emulated device is). The harness sees every `kernels/` file through `-I`, with dynamic shared
/// memory turned into a global array of the harness (see shim.h). A CTA's threads are fibers, as
/// on the emulated device (fiber.h): each warp runs ahead as far as its barriers let it, which
/// shows a missing barrier in one run, where OS threads showed it by luck and took 10-20 times
/// as long.
pub fn build(cpp: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The kernel copies are written once: harnesses build from them on several test threads.
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        // A folder per test binary: cargo may run two of them at once.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(concat!("host-kernels-", env!("CARGO_CRATE_NAME")));
        host_build::host_kernels(&dir);
        dir
    });
    let bin = dir.join(cpp.trim_end_matches(".cpp"));
    let mut gxx = host_build::gxx(dir);
    if sanitized() {
        gxx.args(["-fsanitize=address", "-fno-omit-frame-pointer"]);
    }
    let out = gxx
        .arg("-DHOST_FIBERS")
        .arg("-o")
        .arg(&bin)
        .arg(root.join("tests/cuda_host").join(cpp))
        .output()
        .unwrap_or_else(|e| panic!("g++ (C++20 with _Float16) is needed: {e}"));
    assert!(
        out.status.success(),
        "{cpp}: build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// Whether the harnesses build under AddressSanitizer (`KVSERVE_HOST_SANITIZE=address`): a
/// kernel's read or write past one of its local arrays or past a harness buffer stops the
/// harness with ASan's report, as compute-sanitizer's memcheck would on a GPU (`__shared__`
/// arrays are function statics, which GCC's ASan leaves unguarded). The fibers announce their
/// stack switches to it (fiber.h). CI runs the host kernel tests once more this way (.ci/run);
/// the emulated device, loaded by the Rust test binaries, never builds this way.
pub fn sanitized() -> bool {
    std::env::var("KVSERVE_HOST_SANITIZE").is_ok_and(|v| v == "address")
}

pub fn call(cmd: &str, input: &[u8]) -> Vec<u8> {
    static SEAL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    static ATTN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    static NORM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    static ARGMAX: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    static GEMV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let bin = match cmd {
        "attention" => ATTN.get_or_init(|| build("attention.cpp")),
        "norm" => NORM.get_or_init(|| build("norm.cpp")),
        "argmax" | "draw" => ARGMAX.get_or_init(|| build("sampling.cpp")),
        "gemv" => GEMV.get_or_init(|| build("gemv.cpp")),
        _ => SEAL.get_or_init(|| build("harness.cpp")),
    };
    let dir = bin.parent().unwrap();
    let tag = format!("{cmd}-{:?}", std::thread::current().id()).replace(['(', ')'], "");
    let (i, o) = (
        dir.join(format!("{tag}.in")),
        dir.join(format!("{tag}.out")),
    );
    std::fs::write(&i, input).unwrap();
    // Every other call starts its CTAs' threads in the opposite order (fiber.h): a kernel run
    // as one CTA is then raced in both directions over a test's calls.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut harness = Command::new(bin);
    if CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 2 == 1 {
        harness.env("KVSERVE_FIBERS_DESCENDING", "1");
    }
    if sanitized() {
        // Harnesses exit without freeing what they hold: no leak report.
        harness.env("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1");
    }
    let st = harness.arg(cmd).arg(&i).arg(&o).status().unwrap();
    assert!(st.success(), "harness {cmd}: {st}");
    let out = std::fs::read(&o).unwrap();
    // The inputs run to tens of MB: none is left behind.
    let _ = (std::fs::remove_file(&i), std::fs::remove_file(&o));
    out
}

pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub const NO: u32 = u32::MAX;

/// Little-endian byte writer for the harness input.
#[derive(Default)]
pub struct Bytes(pub Vec<u8>);
impl Bytes {
    pub fn u32(&mut self, v: u32) {
        self.0.extend(v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend(v.to_le_bytes());
    }
    pub fn f32s(&mut self, v: &[f32]) {
        for x in v {
            self.0.extend(x.to_le_bytes());
        }
    }
    pub fn u32s(&mut self, v: &[u32]) {
        for x in v {
            self.0.extend(x.to_le_bytes());
        }
    }
}
