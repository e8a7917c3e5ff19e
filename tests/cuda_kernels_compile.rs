//! Every `kernels/*.cu` file compiles through NVRTC to a CUBIN for sm_80 (Ampere) and sm_90
//! (Hopper), with ptxas's resource report (registers, shared memory, spills) printed. Runs
//! without a GPU: NVRTC alone is needed (CI installs the `nvidia-cuda-nvrtc` wheel and points
//! `KVSERVE_NVRTC_LIB` at its `libnvrtc.so.13`). With `CI=true` a missing NVRTC fails the test.

#[path = "cuda_host/host_build.rs"]
mod host_build;

use kvserve::backend::cuda::compile::{compile_files, nvrtc_version, KERNEL_FILES};
use kvserve::backend::cuda::kernels::kernel_names;
use kvserve::backend::cuda::store::FORMATS;

#[test]
fn every_kernel_file_compiles_for_sm80_and_sm90() {
    if !host_build::nvrtc_or_fail("the kernel compile test") {
        return;
    }
    let (major, minor) = nvrtc_version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    let mut failures = Vec::new();
    // Every (arch, file) at once, as the backend compiles its files at start.
    let jobs: Vec<_> = [80, 90]
        .iter()
        .flat_map(|&arch| {
            KERNEL_FILES
                .iter()
                .map(move |&(file, src)| (file, src, arch))
        })
        .collect();
    for (&(file, _, arch), result) in jobs.iter().zip(compile_files(&jobs, true, &[])) {
        match result {
            Ok(c) => {
                // An ELF image, with the resource report of every entry point.
                assert_eq!(&c.cubin[..4], b"\x7fELF", "{file} sm_{arch}: not a CUBIN");
                eprintln!(
                    "== {file} sm_{arch}: {} bytes\n{}",
                    c.cubin.len(),
                    c.log.trim()
                );
                assert!(
                    c.log.contains("registers"),
                    "{file} sm_{arch}: no ptxas report"
                );
                // Every entry point the backend loads is in the CUBIN, and every kernel in
                // it is named `<op>_<dtype>`.
                let names = global_functions(&c.cubin);
                for (f, name) in kernel_names().iter().filter(|(f, _)| *f == file) {
                    assert!(names.contains(name), "{f} sm_{arch}: no kernel `{name}`");
                }
                for name in &names {
                    let dtype = name.rsplit('_').next().unwrap();
                    assert!(
                        DTYPES.contains(&dtype) || FORMATS.contains(&dtype),
                        "{file}: kernel {name} has no dtype suffix"
                    );
                }
                // No kernel spills registers to local memory.
                for line in c.log.lines().filter(|l| l.contains("bytes spill stores")) {
                    assert!(
                        line.contains(" 0 bytes spill stores, 0 bytes spill loads"),
                        "{file} sm_{arch} spills: {line}"
                    );
                }
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Element types of the non-KV kernels (the KV ones are suffixed with their format).
const DTYPES: [&str; 3] = ["f32", "bf16", "u8"];

/// Names of the global function symbols of an ELF64 little-endian image (a CUBIN's kernels).
fn global_functions(elf: &[u8]) -> Vec<String> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| shoff + i * shentsize;
    let mut out = Vec::new();
    for i in 0..shnum {
        let sh = section(i);
        if u32_at(sh + 4) != 2 {
            continue; // not SHT_SYMTAB
        }
        let (off, size, link) = (u64_at(sh + 0x18), u64_at(sh + 0x20), u32_at(sh + 0x28));
        let strtab = u64_at(section(link) + 0x18);
        for sym in (off..off + size).step_by(24) {
            let info = elf[sym + 4];
            // STB_GLOBAL, STT_FUNC.
            if info >> 4 == 1 && info & 0xf == 2 {
                let name = &elf[strtab + u32_at(sym)..];
                let end = name.iter().position(|&b| b == 0).unwrap();
                out.push(String::from_utf8_lossy(&name[..end]).into_owned());
            }
        }
    }
    out
}

#[test]
fn every_extern_c_entry_point_is_named_op_dtype() {
    // `<op>_<dtype>` names, and a shape comment on every pointer argument.
    for &(file, src) in KERNEL_FILES {
        let mut in_sig = false;
        for line in src.lines() {
            if let Some(rest) = line.split("extern \"C\" __global__ void ").nth(1) {
                // Skip `__launch_bounds__(...)` (or a macro producing it) before the name.
                let rest = match rest.strip_prefix("__launch_bounds__(") {
                    Some(r) => r.split_once(") ").unwrap().1,
                    None if rest.starts_with("DECODE_BOUNDS(") => rest.split_once(") ").unwrap().1,
                    None => rest,
                };
                let name = rest.split('(').next().unwrap();
                let dtype = name.rsplit('_').next().unwrap();
                // Entries stamped out by a macro (`paged_decode_g##G##_##NAME`) are checked
                // by name in the compiled CUBIN instead.
                assert!(
                    name.contains("##") || DTYPES.contains(&dtype),
                    "{file}: {name} has no dtype suffix"
                );
                in_sig = true;
            }
            if in_sig {
                if line.contains('*') && line.contains(',')
                    || line.contains('*') && line.contains(')')
                {
                    assert!(
                        line.contains("// [") || line.contains("/* ["),
                        "{file}: pointer argument without a shape: {line}"
                    );
                }
                if line.contains('{') {
                    in_sig = false;
                }
            }
        }
    }
}
