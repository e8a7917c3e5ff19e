//! What the tests that build `kernels/*.cu` for the host (`cuda_formats_host.rs`,
//! `cuda_emulated.rs`) or through NVRTC (`cuda_kernels_compile.rs`, `cuda_emulated.rs`) share.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Whether NVRTC can be loaded. With `CI=true` a missing NVRTC fails the test instead (CI
/// installs the `nvidia-cuda-nvrtc` wheel and points `KVSERVE_NVRTC_LIB` at it, see .ci/run).
pub fn nvrtc_or_fail(test: &str) -> bool {
    if kvserve::backend::cuda::device::nvrtc_present() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "CI=true but NVRTC cannot be loaded: install the nvidia-cuda-nvrtc wheel and set \
         KVSERVE_NVRTC_LIB to its libnvrtc.so.13 (see .ci/run)"
    );
    eprintln!("NVRTC not found (set KVSERVE_NVRTC_LIB); {test} not run outside CI");
    false
}

/// Copies `kernels/` into `dir` for g++: dynamic shared memory (`extern __shared__`) becomes a
/// plain `extern` array, which the including file defines (tests/cuda_host/shim.h).
pub fn host_kernels(dir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(root.join("kernels")).unwrap() {
        let path = entry.unwrap().path();
        let src = std::fs::read_to_string(&path).unwrap();
        let host = src.replace("extern __shared__", "extern");
        std::fs::write(dir.join(path.file_name().unwrap()), host).unwrap();
    }
}

/// g++ (or `$CXX`) as every host build of the kernels runs it: C++20, no floating-point
/// contraction (the kernels' rounding is the CPU's), the kernel copies in `dir` on the path.
pub fn gxx(dir: &Path) -> Command {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let mut c = Command::new(cxx);
    c.args([
        "-std=c++20",
        "-O1",
        "-ffp-contract=off",
        "-fno-strict-aliasing",
        "-pthread",
    ])
    .arg("-I")
    .arg(dir);
    c
}
