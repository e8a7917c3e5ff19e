//! Kernel sources and their NVRTC compilation. Every `kernels/*.cu` file is embedded in the
//! binary, compiled at start for the device's own architecture straight to a CUBIN (no PTX: a
//! driver can only JIT PTX from an NVRTC no newer than itself), and cached on disk keyed by the
//! source hash, the architecture, the NVRTC version and the driver version.
//!
//! `common.cuh`, `kv_formats.cuh` and `decode_steps.cuh` are pasted in place of each file's
//! `#include` lines, so NVRTC needs no include path and no CUDA headers (bf16 and f16 are
//! handled as raw bits).

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use std::ffi::CString;
use std::path::PathBuf;

/// `kernels/common.cuh`, shared by every file.
const COMMON: &str = include_str!("../../../kernels/common.cuh");
/// `kernels/kv_formats.cuh`: the KV formats and slab addressing (after `common.cuh`).
const KV_FORMATS: &str = include_str!("../../../kernels/kv_formats.cuh");
/// `kernels/decode_steps.cuh`: the decode attention kernel's steps (after `kv_formats.cuh`).
const DECODE_STEPS: &str = include_str!("../../../kernels/decode_steps.cuh");

/// Every kernel file: (file name, source).
pub const KERNEL_FILES: &[(&str, &str)] = &[
    ("norm.cu", include_str!("../../../kernels/norm.cu")),
    (
        "elementwise.cu",
        include_str!("../../../kernels/elementwise.cu"),
    ),
    ("rope_kv.cu", include_str!("../../../kernels/rope_kv.cu")),
    (
        "attention.cu",
        include_str!("../../../kernels/attention.cu"),
    ),
    ("prefill.cu", include_str!("../../../kernels/prefill.cu")),
    ("quest.cu", include_str!("../../../kernels/quest.cu")),
    ("kv_copy.cu", include_str!("../../../kernels/kv_copy.cu")),
    ("kv_seal.cu", include_str!("../../../kernels/kv_seal.cu")),
    ("sampling.cu", include_str!("../../../kernels/sampling.cu")),
    ("gemv.cu", include_str!("../../../kernels/gemv.cu")),
];

/// The source NVRTC sees for `src`: `common.cuh`, `kv_formats.cuh` and `decode_steps.cuh`
/// pasted in place of their include lines.
pub fn expand(src: &str) -> String {
    src.replace("#include \"common.cuh\"", COMMON)
        .replace("#include \"kv_formats.cuh\"", KV_FORMATS)
        .replace("#include \"decode_steps.cuh\"", DECODE_STEPS)
}

/// Programs each file is compiled as (`-DKV_PARTS=P -DKV_PART=i`, kernels/kv_formats.cuh): the
/// per-format entry points of `attention.cu` (4 query-group variants of 9 formats) and
/// `prefill.cu` are most of NVRTC's work at start, 48 s and 9 s of one thread for sm_90 on
/// this project's 2-core machine (54 s on the H200's host, which has 16 cores), so they are
/// split by format and the parts compile on threads of their own.
pub fn parts(file: &str) -> u32 {
    match file {
        "attention.cu" => 9,
        "prefill.cu" => 3,
        _ => 1,
    }
}

/// One program to compile: part `part` of `parts(file)` of a kernel file for `sm_<arch>`.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub file: &'static str,
    pub src: &'static str,
    pub arch: u32,
    pub part: u32,
}

impl Job {
    /// Every part of every kernel file for `sm_<arch>`.
    pub fn all(arch: u32) -> Vec<Job> {
        KERNEL_FILES
            .iter()
            .flat_map(|&(file, src)| {
                (0..parts(file)).map(move |part| Job {
                    file,
                    src,
                    arch,
                    part,
                })
            })
            .collect()
    }

    /// `defines` with this part's selection added (none for a file in one part).
    fn defines<'a>(&self, defines: &[(&'a str, u32)]) -> Vec<(&'a str, u32)> {
        let mut d = defines.to_vec();
        if parts(self.file) > 1 {
            d.extend([("KV_PARTS", parts(self.file)), ("KV_PART", self.part)]);
        }
        d
    }
}

/// One compiled program (a file, or a part of one: see [`parts`]).
#[derive(Debug)]
pub struct Compiled {
    pub file: &'static str,
    pub part: u32,
    pub cubin: Vec<u8>,
    /// The compiler's log (ptxas resource usage with `verbose`).
    pub log: String,
    pub from_cache: bool,
}

/// The NVRTC library's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers; NVRTC is loaded (the caller checked it is present).
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("nvrtcVersion: {e:?}"))?;
    Ok((major, minor))
}

/// NVRTC options for `sm_<arch>` with `-D` tuning `defines`; `verbose` adds ptxas's resource report (one `-Xptxas=` per
/// flag: NVRTC rejects comma-joined ptxas flags).
pub fn options(arch: u32, verbose: bool, defines: &[(&str, u32)]) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture=sm_{arch}"),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    o.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
    if verbose {
        o.push("-Xptxas=-v".to_string());
        o.push("-Xptxas=--warn-on-spills".to_string());
    }
    o
}

/// Compiles one file to a CUBIN for `sm_<arch>` (no cache).
pub fn compile_file(
    file: &'static str,
    src: &str,
    arch: u32,
    verbose: bool,
    defines: &[(&str, u32)],
) -> Result<Compiled, String> {
    let code = CString::new(expand(src)).map_err(|e| format!("{file}: {e}"))?;
    let name = CString::new(file).expect("file names have no NUL");
    let prog = nvrtc::create_program(&code, Some(&name)).map_err(|e| format!("{file}: {e:?}"))?;
    // SAFETY: `prog` was just created and is destroyed exactly once below.
    let compiled = unsafe { nvrtc::compile_program(prog, &options(arch, verbose, defines)) };
    // SAFETY: `prog` is live.
    let log = unsafe { nvrtc::get_program_log(prog) }
        .map(|l| {
            let bytes: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    let result = match compiled {
        Err(e) => Err(format!("{file} for sm_{arch}: {e:?}\n{log}")),
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled; `size` is a valid out-pointer.
            let r = unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) }.result();
            let mut cubin = vec![0u8; size];
            // SAFETY: `cubin` holds exactly the `size` bytes NVRTC reported.
            let r = r.and_then(|()| {
                unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _) }.result()
            });
            match r {
                Ok(()) if size > 0 => Ok(Compiled {
                    file,
                    part: 0,
                    cubin,
                    log: log.clone(),
                    from_cache: false,
                }),
                Ok(()) => Err(format!("{file}: NVRTC returned an empty CUBIN")),
                Err(e) => Err(format!("{file}: nvrtcGetCUBIN: {e:?}")),
            }
        }
    };
    // SAFETY: `prog` is live and not used after this.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    result
}

/// Where compiled modules are cached: `$KVSERVE_CUDA_CACHE`, else `$XDG_CACHE_HOME/kvserve/cuda`,
/// else `~/.cache/kvserve/cuda`, else the system temp dir.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KVSERVE_CUDA_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("kvserve").join("cuda")
}

/// The cache file of `job` for this source, arch, part, NVRTC and driver.
pub fn cache_path(job: &Job, nvrtc: (i32, i32), driver: i32, defines: &[(&str, u32)]) -> PathBuf {
    let mut h = blake3::Hasher::new();
    h.update(expand(job.src).as_bytes());
    h.update(
        options(job.arch, false, &job.defines(defines))
            .join(" ")
            .as_bytes(),
    );
    let hash = h.finalize().to_hex();
    let stem = match parts(job.file) {
        1 => job.file.trim_end_matches(".cu").to_string(),
        n => format!("{}-part{}of{n}", job.file.trim_end_matches(".cu"), job.part),
    };
    let arch = job.arch;
    cache_dir().join(format!(
        "{stem}-sm_{arch}-nvrtc{}.{}-drv{driver}-{}.cubin",
        nvrtc.0,
        nvrtc.1,
        &hash[..16]
    ))
}

/// Compiles `jobs` at once, one thread each, results in `jobs`' order. NVRTC takes concurrent
/// calls on distinct programs; the programs differ a lot in size, so at start the slowest one
/// bounds the wait instead of the sum of all of them.
pub fn compile_files(
    jobs: &[Job],
    verbose: bool,
    defines: &[(&str, u32)],
) -> Vec<Result<Compiled, String>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|&job| {
                s.spawn(move || {
                    let c =
                        compile_file(job.file, job.src, job.arch, verbose, &job.defines(defines));
                    c.map(|c| Compiled {
                        part: job.part,
                        ..c
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(jobs)
            .map(|(h, job)| {
                h.join().unwrap_or_else(|_| {
                    Err(format!(
                        "{} (part {}) for sm_{}: the compile thread panicked",
                        job.file, job.part, job.arch
                    ))
                })
            })
            .collect()
    })
}

/// Every kernel file for `sm_<arch>`, from the disk cache when present, the others compiled
/// concurrently (a cache that cannot be written is only logged: compiling again next start is
/// correct, just slower).
pub fn compile_all(
    arch: u32,
    driver: i32,
    defines: &[(&str, u32)],
) -> Result<Vec<Compiled>, String> {
    let nv = nvrtc_version()?;
    let mut out: Vec<Option<Compiled>> = Vec::new();
    // The programs to compile, with their cache paths.
    let (mut jobs, mut paths) = (Vec::new(), Vec::new());
    for job in Job::all(arch) {
        let path = cache_path(&job, nv, driver, defines);
        match std::fs::read(&path) {
            Ok(cubin) if !cubin.is_empty() => out.push(Some(Compiled {
                file: job.file,
                part: job.part,
                cubin,
                log: String::new(),
                from_cache: true,
            })),
            _ => {
                out.push(None);
                jobs.push(job);
                paths.push(path);
            }
        }
    }
    let compiled = compile_files(&jobs, false, defines).into_iter().zip(paths);
    for (slot, (c, path)) in out.iter_mut().filter(|c| c.is_none()).zip(compiled) {
        let c = c?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = std::fs::create_dir_all(cache_dir())
            .and_then(|()| std::fs::write(&tmp, &c.cubin))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache a compiled kernel module");
        }
        *slot = Some(c);
    }
    Ok(out.into_iter().flatten().collect())
}

/// The kernels ptxas reports spilling in a verbose compile's `log` (`-Xptxas=-v`), with the larger
/// of their spill stores and loads in bytes, in the log's order (a kernel may appear twice: its
/// warning and its report line).
pub fn spills(log: &str) -> Vec<(String, usize)> {
    let mut kernel = "";
    let mut out = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            kernel = rest.split('\'').next().unwrap_or("");
        }
        if let Some(bytes) = spill_bytes(line) {
            // ptxas's warning names its kernel; the report line follows the entry's name.
            let named = line
                .split("in function '")
                .nth(1)
                .and_then(|r| r.split('\'').next())
                .unwrap_or(kernel);
            out.push((named.to_string(), bytes));
        }
    }
    out
}

/// The larger of the spill stores and loads ptxas reports on `line`, if it reports a spill.
fn spill_bytes(line: &str) -> Option<usize> {
    let number_before = |what: &str| -> Option<usize> {
        let head = line.split(what).next()?;
        head.trim_end().rsplit([' ', ',']).next()?.parse().ok()
    };
    if !line.contains("bytes spill stores") {
        return None;
    }
    let bytes = number_before(" bytes spill stores")?.max(number_before(" bytes spill loads")?);
    (bytes > 0).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spills_are_read_from_ptxas_logs() {
        let log = "\
ptxas info    : Compiling entry function 'a_bf16' for 'sm_90'
ptxas info    : Function properties for a_bf16
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas warning : Registers are spilled to local memory in function 'b_bf16', 60 bytes spill stores, 56 bytes spill loads
ptxas info    : Compiling entry function 'b_bf16' for 'sm_90'
ptxas         .     32 bytes stack frame, 60 bytes spill stores, 56 bytes spill loads
ptxas info    : Compiling entry function 'c_f32' for 'sm_90'
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 72 bytes spill loads
ptxas info    : Used 80 registers";
        assert_eq!(
            spills(log),
            vec![
                ("b_bf16".to_string(), 60),
                ("b_bf16".to_string(), 60),
                ("c_f32".to_string(), 72)
            ]
        );
        assert!(spills("ptxas info    : Used 80 registers").is_empty());
    }

    #[test]
    fn split_files_have_a_program_per_part() {
        let jobs = Job::all(90);
        let parts_of = |f: &str| jobs.iter().filter(|j| j.file == f).count() as u32;
        for &(file, _) in KERNEL_FILES {
            assert_eq!(parts_of(file), parts(file), "{file}");
        }
        let a: Vec<&Job> = jobs.iter().filter(|j| j.file == "attention.cu").collect();
        assert!(a.len() > 1);
        for (i, j) in a.iter().enumerate() {
            assert_eq!(j.part, i as u32);
            let d = j.defines(&[("X", 1)]);
            assert_eq!(
                d,
                vec![
                    ("X", 1),
                    ("KV_PARTS", parts("attention.cu")),
                    ("KV_PART", i as u32)
                ]
            );
        }
        // Files in one part are compiled as before, with no selection defines.
        let norm = jobs.iter().find(|j| j.file == "norm.cu").unwrap();
        assert_eq!(norm.defines(&[]), vec![]);
        // Every part has a cache file of its own.
        let paths: std::collections::HashSet<_> = jobs
            .iter()
            .map(|j| cache_path(j, (13, 0), 13000, &[]))
            .collect();
        assert_eq!(paths.len(), jobs.len());
    }
}
