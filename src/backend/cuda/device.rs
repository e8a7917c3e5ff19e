//! Finding a usable GPU without ever letting cudarc's loader panic: cudarc loads libcuda, NVRTC
//! and cuBLAS on first use and panics when one is missing, so every library is probed first
//! (`is_culib_present`), then the driver is initialised and the devices counted. The answer is a
//! [`Choice`] that says which device and why, or an error that says why not.
//!
//! `KVSERVE_NVRTC_LIB` / `KVSERVE_CUBLAS_LIB` may name a library file to use (a pip wheel's
//! `libnvrtc.so.13`, or the GPU machine's own toolkit): it is opened by path before cudarc looks
//! for it, and the dynamic loader then hands cudarc that already-loaded library for its soname.

use cudarc::driver::{result as drv, sys as drv_sys};
use std::sync::OnceLock;

/// What `--device` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    /// `cuda` or `cuda:N`.
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N")),
        }
    }
}

/// A usable CUDA device.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability as `major * 10 + minor` (90 for Hopper).
    pub arch: u32,
    /// `cuDriverGetVersion`, e.g. 13000.
    pub driver: i32,
    pub total_mem: usize,
}

/// Opens the libraries named by `KVSERVE_NVRTC_LIB` / `KVSERVE_CUBLAS_LIB` once and keeps them
/// loaded for the life of the process. Returns an error naming a file that cannot be opened.
pub fn preload_named_libs() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            for var in ["KVSERVE_NVRTC_LIB", "KVSERVE_CUBLAS_LIB"] {
                if let Some(path) = std::env::var_os(var) {
                    // SAFETY: loading a CUDA library runs only its own initialisers.
                    let lib = unsafe { libloading::Library::new(&path) }
                        .map_err(|e| format!("{var}={}: {e}", path.to_string_lossy()))?;
                    // Kept loaded for the process: cudarc's own dlopen by soname finds it.
                    std::mem::forget(lib);
                }
            }
            Ok(())
        })
        .clone()
}

/// Whether NVRTC can be loaded (after [`preload_named_libs`]).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open candidate library names.
    preload_named_libs().is_ok() && unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Probes device `ordinal`: every library present, the driver initialises, the device exists.
/// Never panics; the error says what is missing.
pub fn probe(ordinal: usize) -> Result<GpuInfo, String> {
    preload_named_libs()?;
    // SAFETY: only tries to open candidate library names.
    if !unsafe { drv_sys::is_culib_present() } {
        return Err("no CUDA driver library (libcuda.so.1) on this machine".into());
    }
    drv::init().map_err(|e| format!("the CUDA driver did not initialise: {e}"))?;
    let count = drv::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
    if count <= 0 {
        return Err("the CUDA driver reports no device".into());
    }
    if ordinal >= count as usize {
        return Err(format!(
            "cuda:{ordinal} requested but only {count} device(s)"
        ));
    }
    // SAFETY: only tries to open candidate library names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("no NVRTC library (libnvrtc.so.13); set KVSERVE_NVRTC_LIB".into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err("no cuBLAS library (libcublas.so.13); set KVSERVE_CUBLAS_LIB".into());
    }
    let dev = drv::device::get(ordinal as i32).map_err(|e| format!("cuDeviceGet: {e}"))?;
    let attr = |a| {
        // SAFETY: `dev` is a valid device handle from cuDeviceGet.
        unsafe { drv::device::get_attribute(dev, a) }
            .map_err(|e| format!("cuDeviceGetAttribute: {e}"))
    };
    use drv_sys::CUdevice_attribute::*;
    let arch = (attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? * 10
        + attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?) as u32;
    if arch < 80 {
        return Err(format!(
            "sm_{arch} is older than the sm_80 (Ampere) the kernels need"
        ));
    }
    let name = drv::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
    // SAFETY: `dev` is valid.
    let total_mem = unsafe { drv::device::total_mem(dev) }.unwrap_or(0);
    let mut driver = 0;
    // SAFETY: valid out-pointer.
    unsafe { drv_sys::cuDriverGetVersion(&mut driver) };
    Ok(GpuInfo {
        ordinal,
        name,
        arch,
        driver,
        total_mem,
    })
}

/// Which backend a `--device` argument resolves to.
#[derive(Debug, Clone)]
pub enum Choice {
    Cpu { reason: String },
    Cuda(GpuInfo),
}

/// Resolves `--device`: `auto` takes the GPU when [`probe`] succeeds, else the CPU with the
/// reason; `cuda[:N]` without a usable GPU is an error naming what is missing.
pub fn choose(arg: DeviceArg) -> Result<Choice, String> {
    match arg {
        DeviceArg::Cpu => Ok(Choice::Cpu {
            reason: "--device cpu".into(),
        }),
        DeviceArg::Cuda(n) => probe(n)
            .map(Choice::Cuda)
            .map_err(|why| format!("--device cuda:{n}: no usable GPU: {why}")),
        DeviceArg::Auto => Ok(match probe(0) {
            Ok(info) => Choice::Cuda(info),
            Err(why) => Choice::Cpu {
                reason: format!("no usable GPU: {why}"),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_args_parse() {
        assert_eq!("auto".parse::<DeviceArg>(), Ok(DeviceArg::Auto));
        assert_eq!("cpu".parse::<DeviceArg>(), Ok(DeviceArg::Cpu));
        assert_eq!("cuda".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(3)));
        assert!("gpu".parse::<DeviceArg>().is_err());
        assert!("cuda:x".parse::<DeviceArg>().is_err());
    }

    #[test]
    fn cpu_choice_never_touches_cuda() {
        match choose(DeviceArg::Cpu).unwrap() {
            Choice::Cpu { reason } => assert_eq!(reason, "--device cpu"),
            Choice::Cuda(_) => panic!("--device cpu chose a GPU"),
        }
    }
}
