//! Every `kernels/*.cu` file compiles through NVRTC to a CUBIN for sm_80 (Ampere) and sm_90
//! (Hopper), with ptxas's resource report (registers, shared memory, spills) printed. Runs
//! without a GPU: NVRTC alone is needed (CI installs the `nvidia-cuda-nvrtc` wheel and points
//! `KVSERVE_NVRTC_LIB` at its `libnvrtc.so.13`). With `CI=true` a missing NVRTC fails the test.

#[path = "cuda_host/host_build.rs"]
mod host_build;

use kvserve::backend::cuda::compile::{
    compile_files, nvrtc_version, parts, spills, Job, KERNEL_FILES,
};
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
    // Every (arch, file, part) at once, as the backend compiles its programs at start.
    let jobs: Vec<Job> = [80, 90].into_iter().flat_map(Job::all).collect();
    // The kernels of each (file, arch) over its parts.
    let mut found: std::collections::BTreeMap<(&str, u32), Vec<String>> = Default::default();
    for (job, result) in jobs.iter().zip(compile_files(&jobs, true, &[])) {
        let (file, arch, part) = (job.file, job.arch, job.part);
        match result {
            Ok(c) => {
                // An ELF image, with the resource report of every entry point.
                assert_eq!(&c.cubin[..4], b"\x7fELF", "{file} sm_{arch}: not a CUBIN");
                eprintln!(
                    "== {file} part {part} of {} sm_{arch}: {} bytes\n{}",
                    parts(file),
                    c.cubin.len(),
                    c.log.trim()
                );
                assert!(
                    c.log.contains("registers"),
                    "{file} sm_{arch}: no ptxas report"
                );
                // Every kernel is named `<op>_<dtype>`, and in one part only.
                let names = global_functions(&c.cubin);
                let seen = found.entry((file, arch)).or_default();
                for name in &names {
                    assert!(
                        !seen.contains(name),
                        "{file} sm_{arch}: {name} in two parts"
                    );
                }
                seen.extend(names.iter().cloned());
                for name in &names {
                    let dtype = name.rsplit('_').next().unwrap();
                    assert!(
                        DTYPES.contains(&dtype) || FORMATS.contains(&dtype),
                        "{file}: kernel {name} has no dtype suffix"
                    );
                }
                // No kernel spills registers to local memory, but for the one measured
                // exception (`ALLOWED_SPILLS`).
                for (kernel, bytes) in spills(&c.log) {
                    let allowed = ALLOWED_SPILLS
                        .iter()
                        .find(|(a, k, _)| *a == arch && *k == kernel)
                        .map_or(0, |&(_, _, b)| b);
                    assert!(
                        bytes <= allowed,
                        "{file} sm_{arch} {kernel} spills {bytes} bytes ({allowed} allowed)"
                    );
                }
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every entry point the backend loads is in one of its file's parts.
    for arch in [80, 90] {
        for (file, name) in kernel_names() {
            let names = &found[&(file, arch)];
            assert!(
                names.contains(&name),
                "{file} sm_{arch}: no kernel `{name}`"
            );
        }
    }
    // A split file's parts each hold a share of its formats.
    let decode_parts = jobs.iter().filter(|j| j.file == "attention.cu").count();
    assert_eq!(decode_parts, 2 * parts("attention.cu") as usize);
    assert!(parts("attention.cu") > 1 && parts("prefill.cu") > 1);
}

/// Element types of the non-KV kernels (the KV ones are suffixed with their format).
const DTYPES: [&str; 3] = ["f32", "bf16", "u8"];

/// Spills allowed, as (arch, kernel, most bytes stored or loaded). The exact decode kernel of
/// a query group of 4 loads 8 positions per step on sm_90 (`DECODE_UNROLL`), which needs more
/// registers than its 6-CTA cap: NVRTC 13.5 spilled 60 bytes per thread there until
/// 2026-12-01; since the per-position read flags became a bit mask (`read` in attention.cu),
/// 4 bytes stored and 12 loaded. On an H200 the 60-byte build read 73.2–73.6 % of copy
/// bandwidth at 128 × 4096 against 68.1–68.8 % at 4 positions per step without spills
/// (docs/cuda.md), so a spill is allowed; 16 bytes leave room for another NVRTC 13.x, and a
/// return of the 60 fails here.
const ALLOWED_SPILLS: [(u32, &str, usize); 1] = [(90, "paged_decode_g4_bf16", 16)];

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
