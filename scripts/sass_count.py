#!/usr/bin/env python3
"""Instructions the sealed-format decode issues, counted in the SASS (no GPU needed).

Compiles a probe kernel per run format (one thread decoding 8 channels of 4 positions of one
block with `run_8`, then using every value) against `kernels/kv_formats.cuh` of the working tree
and of a git revision, for sm_90 through NVRTC, disassembles it and prints the instruction
histogram of each. A static count, not a timing: it shows what a change adds or removes per
position (conversions, loads), which on an issue-bound kernel is what its speed follows.

Needs NVRTC (`$KVSERVE_NVRTC_LIB`, as the CUDA tests) and cuobjdump with nvdisasm on PATH (pip
wheels `nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm`).

Usage: scripts/sass_count.py [REV]   (REV defaults to HEAD)
"""
import collections
import ctypes
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = r'''
template <int F>
__device__ void body(const unsigned char* run, float* out, int bs, int dim, int t0) {
    const int c0 = (threadIdx.x % (dim / 8)) * 8;
    float acc = 0.0f;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        float f[8];
        run_8<F>(run, bs, dim, t0 + u, c0, f);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc += f[j] * (float)(j + 1);
    }
    out[threadIdx.x] = acc;
}
#define P(NAME, F) extern "C" __global__ void NAME(const unsigned char* r, float* o, int bs, \
    int dim, int t0) { body<F>(r, o, bs, dim, t0); }
P(bf16, FMT_BF16) P(int8, FMT_I8) P(tok4, FMT_TOK4) P(ch4, FMT_CH4) P(tok2, FMT_TOK2)
P(ch2, FMT_CH2)
'''


def cubin(src):
    nv = ctypes.CDLL(os.environ["KVSERVE_NVRTC_LIB"])
    prog = ctypes.c_void_p()
    assert nv.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"probe.cu", 0, None, None) == 0
    opts = [b"--gpu-architecture=sm_90", b"--std=c++17", b"-default-device"]
    if nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)) != 0:
        n = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        nv.nvrtcGetProgramLog(prog, log)
        sys.exit(log.value.decode())
    n = ctypes.c_size_t()
    nv.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    out = ctypes.create_string_buffer(n.value)
    nv.nvrtcGetCUBIN(prog, out)
    return out.raw


def histograms(formats_src):
    common = open(os.path.join(ROOT, "kernels/common.cuh")).read()
    src = (common + formats_src).replace("#pragma once", "") + PROBE
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin(src))
        f.flush()
        sass = subprocess.run(["cuobjdump", "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    out = {}
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        count = collections.Counter()
        for line in part.split("\n"):
            m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
            if m and m.group(2) not in ("NOP", "BRA", "EXIT"):
                count[m.group(2)] += 1
        out[part.split("\n", 1)[0].strip()] = count
    return out


def main():
    rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
    then = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:kernels/kv_formats.cuh"],
                          capture_output=True, text=True, check=True).stdout
    now = open(os.path.join(ROOT, "kernels/kv_formats.cuh")).read()
    a, b = histograms(then), histograms(now)
    for name in ["bf16", "int8", "tok4", "ch4", "tok2", "ch2"]:
        for label, h in ((rev, a[name]), ("worktree", b[name])):
            top = " ".join(f"{k}:{v}" for k, v in h.most_common(10))
            print(f"{name:5} {label:9} {sum(h.values()):4} instructions  {top}")


if __name__ == "__main__":
    main()
