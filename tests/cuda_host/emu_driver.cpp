// An emulated CUDA device for tests (tests/cuda_emulated.rs): a libcuda.so (and libcublas.so) that
// implements the part of the driver and cuBLAS APIs the CUDA backend uses, on the CPU. Device
// memory is host memory (a device pointer is a host address), every operation runs at once, in
// call order, on the calling thread (the backend uses one stream), and cuLaunchKernel runs the
// kernel's host build (the same kernels/*.cu, compiled by g++ with shim.h, CTA by CTA on fibers)
// found by name in the registry (emu.h). Modules are not read: cuModuleLoadData accepts the
// NVRTC CUBIN and cuModuleGetFunction looks the name up. cublasGemmEx is a plain f32 loop.
//
// What it cannot show: anything about real hardware (timing, the PTX f16 conversions, memory
// ordering between CTAs running at once). What it does show: the backend's host code and the
// kernels together, op by op, through the same calls a GPU gets.
#include "shim.h"
#include "emu.h"
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <signal.h>
#include <string>
#include <sys/mman.h>
#include <unistd.h>

namespace {

// Never destroyed: the counters below read it at exit (and cudarc opens and closes the library
// while probing, which runs static destructors).
std::map<std::string, emu::Entry>& registry() {
    static auto* r = new std::map<std::string, emu::Entry>;
    return *r;
}
std::mutex g_lock;  // one launch or copy at a time
int env_int(const char* name, int fallback) {
    const char* v = std::getenv(name);
    return v ? std::atoi(v) : fallback;
}
// The device's memory: KVSERVE_EMU_MEM_BYTES (default 16 GiB).
size_t total_bytes() {
    static const size_t t = [] {
        const char* v = std::getenv("KVSERVE_EMU_MEM_BYTES");
        return v ? (size_t)std::strtoull(v, nullptr, 10) : (size_t)16 << 30;
    }();
    return t;
}

// KVSERVE_EMU_SKIP_KERNELS=1: launches are counted, not run (small allocations start zeroed, so
// the tokens a skipped argmax leaves are 0): what is left is the host's own cost per step (the
// backend's planning, uploads and launch calls), which bounds a step on any device.
// KVSERVE_EMU_STATS=1 prints the counts at exit, per kernel too.
const bool g_skip = env_int("KVSERVE_EMU_SKIP_KERNELS", 0) != 0;

struct Counters {
    unsigned long long launches = 0, allocs = 0, memsets = 0, copies = 0, syncs = 0;
    std::map<emu::Entry, unsigned long long> per_kernel;
    ~Counters() {
        if (launches + allocs + copies == 0) return;  // a copy opened only to probe
        if (env_int("KVSERVE_EMU_STATS", 0))
            for (auto& [name, entry] : registry())
                if (per_kernel.count(entry))
                    std::fprintf(stderr, "emulated device: %llu x %s\n", per_kernel[entry], name.c_str());
        if (env_int("KVSERVE_EMU_STATS", 0))
            std::fprintf(stderr,
                         "emulated device: %llu launches, %llu allocations, %llu memsets, %llu copies, "
                         "%llu stream syncs\n",
                         launches, allocs, memsets, copies, syncs);
    }
} g_count;

// KVSERVE_EMU_LOSE_DEVICE_WHEN=PATH: the first kernel launch after the file PATH appears faults
// the way a kernel that touches an illegal address does on a GPU. The launch itself returns
// success (launches are asynchronous) and the kernel does not run; every later call that
// reaches the device (a launch, a copy, a memset, an allocation or free, a synchronisation, a
// GEMM) fails with CUDA_ERROR_ILLEGAL_ADDRESS, as a sticky error leaves the context unusable for
// good. For the server's answer to a lost device (tests/cuda_emulated.rs).
const char* const g_lose_when = std::getenv("KVSERVE_EMU_LOSE_DEVICE_WHEN");
// KVSERVE_EMU_HANG_WHEN=PATH: the first launch after PATH appears never returns, as the host
// waits forever on a GPU that stopped answering (the engine's step watchdog, same test).
const char* const g_hang_when = std::getenv("KVSERVE_EMU_HANG_WHEN");
std::atomic<bool> g_lost{false};

}  // namespace

void emu::add(const Reg* regs, size_t n) {
    for (size_t i = 0; i < n; ++i) registry()[regs[i].name] = regs[i].run;
}

extern "C" {

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* Handle;

enum {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_FOUND = 500,
    ILLEGAL_ADDRESS = 700,
};
#define FAIL_IF_LOST \
    if (g_lost) return ILLEGAL_ADDRESS

CUresult cuInit(unsigned) { return SUCCESS; }
CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return SUCCESS;
}
CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return INVALID_VALUE;
    *d = 0;
    return SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, len, "kvserve emulated device (host CPU)");
    return SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = total_bytes();
    return SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 1: *v = 1024; break;                                // max threads per block
        case 10: *v = 32; break;                                 // warp size
        case 16: *v = env_int("KVSERVE_EMU_SMS", 132); break;    // multiprocessors (an H200's)
        case 75: *v = env_int("KVSERVE_EMU_ARCH", 90) / 10; break;  // compute capability
        case 76: *v = env_int("KVSERVE_EMU_ARCH", 90) % 10; break;
        case 97: *v = 227 << 10; break;                          // shared memory per block, opt-in
        case 8: *v = 48 << 10; break;                            // shared memory per block
        case 115: *v = 1; break;                                 // memory pools
        default: *v = 0;
    }
    return SUCCESS;
}
CUresult cuDeviceGetUuid(void* u, CUdevice) {
    std::memset(u, 0, 16);
    return SUCCESS;
}
CUresult cuDeviceGetUuid_v2(void* u, CUdevice d) { return cuDeviceGetUuid(u, d); }

static int g_ctx_token;
CUresult cuDevicePrimaryCtxRetain(Handle* ctx, CUdevice) {
    *ctx = &g_ctx_token;
    return SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return SUCCESS; }
CUresult cuCtxSetCurrent(Handle) { return SUCCESS; }
CUresult cuCtxGetCurrent(Handle* ctx) {
    *ctx = &g_ctx_token;
    return SUCCESS;
}
CUresult cuCtxSynchronize() {
    FAIL_IF_LOST;
    return SUCCESS;
}
CUresult cuCtxSetFlags(unsigned) { return SUCCESS; }
CUresult cuCtxGetStreamPriorityRange(int* lo, int* hi) {
    *lo = *hi = 0;
    return SUCCESS;
}

static int g_stream_token, g_pool_token, g_event_token;
CUresult cuStreamCreate(Handle* s, unsigned) {
    *s = &g_stream_token;
    return SUCCESS;
}
CUresult cuStreamCreateWithPriority(Handle* s, unsigned, int) { return cuStreamCreate(s, 0); }
CUresult cuStreamDestroy_v2(Handle) { return SUCCESS; }
CUresult cuStreamSynchronize(Handle) {
    FAIL_IF_LOST;
    g_count.syncs++;
    return SUCCESS;
}
CUresult cuStreamWaitEvent(Handle, Handle, unsigned) { return SUCCESS; }
CUresult cuStreamIsCapturing(Handle, int* status) {
    *status = 0;
    return SUCCESS;
}
CUresult cuEventCreate(Handle* e, unsigned) {
    *e = &g_event_token;
    return SUCCESS;
}
CUresult cuEventDestroy_v2(Handle) { return SUCCESS; }
CUresult cuEventRecord(Handle, Handle) {
    FAIL_IF_LOST;
    return SUCCESS;
}
CUresult cuEventSynchronize(Handle) {
    FAIL_IF_LOST;
    return SUCCESS;
}
CUresult cuEventQuery(Handle) { return SUCCESS; }
CUresult cuEventElapsedTime(float* ms, Handle, Handle) {
    *ms = 0.0f;
    return SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, Handle a, Handle b) { return cuEventElapsedTime(ms, a, b); }

CUresult cuDeviceGetDefaultMemPool(Handle* pool, CUdevice) {
    *pool = &g_pool_token;
    return SUCCESS;
}
CUresult cuMemPoolSetAttribute(Handle, int, void*) { return SUCCESS; }
CUresult cuMemPoolGetAttribute(Handle, int, void* v) {
    *(unsigned long long*)v = 0;
    return SUCCESS;
}
CUresult cuMemPoolTrimTo(Handle, size_t) { return SUCCESS; }

// Device memory: host memory, 256-byte aligned like the driver's. Freed memory is kept for reuse
// by size, as the stream-ordered pool the backend configures keeps it (and so that the host's
// page faults do not swamp what KVSERVE_EMU_SKIP_KERNELS measures). Each allocation is filled
// with 0xFF (NaN as f32 and bf16) instead of zeroed: as on a GPU, the backend must write what it
// reads (cuMemsetD8 is the zeroing), and reading what nothing wrote shows up as NaN.
// The device has KVSERVE_EMU_MEM_BYTES bytes (default 16 GiB), and cuMemGetInfo counts memory
// kept for reuse as used, as the driver counts a pool's reserved memory: an allocation past
// the total first gives the kept memory back, then fails with CUDA_ERROR_OUT_OF_MEMORY.
//
// Each allocation is mapped on its own and ends where a page that cannot be touched begins (its
// start moved up to keep the 256-byte alignment), and memory kept for reuse cannot be touched
// until it is handed out again. So a kernel or copy that reads or writes past the end of its
// buffer (by more than the rounding to 256 bytes), or a buffer after it was freed, faults at
// that access instead of reading a neighbour, as compute-sanitizer's memcheck would report it on
// a GPU; the fault handler names the kernel and the buffer, then aborts.
namespace {
std::mutex g_mem_lock;
struct Mapping {
    char* base;   // the mapping: head padding, the buffer, one page with no access
    size_t len;
    size_t size;  // the buffer's bytes (a multiple of 256)
};
std::map<size_t, std::vector<void*>> g_free;
std::map<void*, Mapping> g_map;  // every allocation, live or kept, by its device pointer
std::map<void*, size_t> g_size;  // live allocations' sizes
size_t g_live = 0, g_kept = 0;   // bytes in live allocations / kept for reuse
emu::Entry g_running = nullptr;  // the kernel running, for the fault report
struct sigaction g_prev_segv;

size_t page_bytes() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

// Faults in a guard page or in kept memory are reported and abort; any other goes on to the
// handler that was there before (Rust's stack-overflow report).
void on_segv(int sig, siginfo_t* info, void* ctx) {
    const char* a = (const char*)info->si_addr;
    for (auto& [ptr, m] : g_map) {
        if (a < m.base || a >= m.base + m.len) continue;
        const char* buf = (const char*)ptr;
        const char* name = "a copy or the host";
        for (auto& [n, e] : registry())
            if (g_running && e == g_running) name = n.c_str();
        const bool live = g_size.count(ptr) != 0;
        // Formatted into a static buffer and written: the handler runs on the thread's small
        // signal stack, too small for stderr's unbuffered fprintf.
        static char msg[512];
        const int n = std::snprintf(msg, sizeof msg,
                                    "emulated device: %s touched %p, %zd bytes from the start of "
                                    "a%s %zu-byte buffer at %p\n",
                                    name, (const void*)a, (ssize_t)(a - buf), live ? "" : " freed",
                                    m.size, ptr);
        if (write(2, msg, n > 0 ? (size_t)n : 0) < 0) {}
        std::abort();
    }
    if (g_prev_segv.sa_flags & SA_SIGINFO) {
        if (g_prev_segv.sa_sigaction) return g_prev_segv.sa_sigaction(sig, info, ctx);
    } else if (g_prev_segv.sa_handler != SIG_DFL && g_prev_segv.sa_handler != SIG_IGN) {
        return g_prev_segv.sa_handler(sig);
    }
    signal(SIGSEGV, SIG_DFL);  // the fault happens again, with the default action
}

void* map_buffer(size_t size) {
    const size_t pg = page_bytes();
    const size_t len = (size + pg - 1) / pg * pg + pg;
    void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) return nullptr;
    char* base = (char*)m;
    mprotect(base + len - pg, pg, PROT_NONE);
    char* ptr = base + len - pg - size;
    g_map[ptr] = Mapping{base, len, size};
    return ptr;
}

// The pages of a buffer (not its guard): open to the kernels, or shut while it is kept.
void set_access(void* ptr, bool open) {
    const Mapping& m = g_map.at(ptr);
    const size_t pg = page_bytes();
    char* first = (char*)((uintptr_t)ptr / pg * pg);
    mprotect(first, (size_t)(m.base + m.len - pg - first), open ? PROT_READ | PROT_WRITE : PROT_NONE);
}
}  // namespace

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    static std::once_flag handler;
    std::call_once(handler, [] {
        struct sigaction sa {};
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_prev_segv);
    });
    FAIL_IF_LOST;
    const size_t size = bytes == 0 ? 256 : (bytes + 255) / 256 * 256;
    std::lock_guard<std::mutex> g(g_mem_lock);
    void* m = nullptr;
    auto it = g_free.find(size);
    if (it != g_free.end() && !it->second.empty()) {
        m = it->second.back();
        it->second.pop_back();
        g_kept -= size;
        set_access(m, true);
    } else {
        if (g_live + g_kept + size > total_bytes()) {
            for (auto& [_, list] : g_free)
                for (void* f : list) {
                    munmap(g_map.at(f).base, g_map.at(f).len);
                    g_map.erase(f);
                }
            g_free.clear();
            g_kept = 0;
        }
        if (g_live + size > total_bytes()) return OUT_OF_MEMORY;
        m = map_buffer(size);
        if (!m) return OUT_OF_MEMORY;
    }
    g_live += size;
    if (!g_skip)
        std::memset(m, 0xFF, size);
    else if (size <= (64 << 10))
        std::memset(m, 0, size);  // token outputs of skipped kernels: id 0, not garbage
    g_size[m] = size;
    g_count.allocs++;
    *p = (CUdeviceptr)m;
    return SUCCESS;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    FAIL_IF_LOST;
    std::lock_guard<std::mutex> g(g_mem_lock);
    auto it = g_size.find((void*)p);
    if (it == g_size.end()) return INVALID_VALUE;
    g_free[it->second].push_back((void*)p);
    g_live -= it->second;
    g_kept += it->second;
    set_access((void*)p, false);
    g_size.erase(it);
    return SUCCESS;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, Handle) { return cuMemAlloc_v2(p, bytes); }
CUresult cuMemFreeAsync(CUdeviceptr p, Handle) { return cuMemFree_v2(p); }
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    std::lock_guard<std::mutex> g(g_mem_lock);
    const size_t used = g_live + g_kept;
    *total = total_bytes();
    *free_b = used < *total ? *total - used : 0;
    return SUCCESS;
}
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = std::malloc(bytes ? bytes : 1);
    return *p ? SUCCESS : OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void* p) {
    std::free(p);
    return SUCCESS;
}
CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    FAIL_IF_LOST;
    g_count.memsets++;
    if (!g_skip) std::memset((void*)p, v, n);
    return SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, Handle) { return cuMemsetD8_v2(p, v, n); }
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) {
    FAIL_IF_LOST;
    g_count.copies++;
    std::memcpy((void*)d, s, n);
    return SUCCESS;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, Handle) { return cuMemcpyHtoD_v2(d, s, n); }
CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) {
    FAIL_IF_LOST;
    g_count.copies++;
    std::memcpy(d, (const void*)s, n);
    return SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, Handle) { return cuMemcpyDtoH_v2(d, s, n); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    FAIL_IF_LOST;
    std::memmove((void*)d, (const void*)s, n);
    return SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, Handle) { return cuMemcpyDtoD_v2(d, s, n); }

static int g_module_token;
CUresult cuModuleLoadData(Handle* m, const void*) {
    FAIL_IF_LOST;
    *m = &g_module_token;
    return SUCCESS;
}
CUresult cuModuleUnload(Handle) { return SUCCESS; }
CUresult cuModuleGetFunction(Handle* f, Handle, const char* name) {
    auto it = registry().find(name);
    if (it == registry().end()) {
        std::fprintf(stderr, "emulated device: no kernel %s\n", name);
        return NOT_FOUND;
    }
    *f = (Handle)it->second;
    return SUCCESS;
}
CUresult cuFuncSetAttribute(Handle, int, int) { return SUCCESS; }
CUresult cuFuncGetAttribute(int* v, int, Handle) {
    *v = 0;
    return SUCCESS;
}
CUresult cuFuncSetCacheConfig(Handle, int) { return SUCCESS; }
// Resident CTAs per multiprocessor: one fixed answer (the emulator has no registers to count);
// $KVSERVE_EMU_CTAS_PER_SM, 6 by default (paged_decode_g4_bf16's launch bound on an H200).
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, Handle f, int block, size_t,
                                                              unsigned) {
    if (!f || block <= 0 || block > 1024) return INVALID_VALUE;
    *n = env_int("KVSERVE_EMU_CTAS_PER_SM", 6);
    return SUCCESS;
}

CUresult cuLaunchKernel(Handle f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned, Handle, void** params, void** extra) {
    if (by != 1 || bz != 1 || extra || !f || gx == 0 || gy == 0 || gz == 0 || bx == 0 || bx > 1024)
        return INVALID_VALUE;
    FAIL_IF_LOST;
    if (g_hang_when && access(g_hang_when, F_OK) == 0) {
        std::fprintf(stderr, "emulated device: a launch that never ends\n");
        for (;;) pause();
    }
    std::lock_guard<std::mutex> g(g_lock);
    g_count.launches++;
    g_count.per_kernel[(emu::Entry)f]++;
    if (g_lose_when && access(g_lose_when, F_OK) == 0) {
        std::fprintf(stderr, "emulated device: launch %llu faults: the device is lost\n", g_count.launches);
        g_lost = true;
        return SUCCESS;
    }
    g_running = (emu::Entry)f;
    if (!g_skip) ((emu::Entry)f)(params, dim3h{gx, gy, gz}, bx);
    g_running = nullptr;
    return SUCCESS;
}

CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == SUCCESS           ? "no error"
         : e == NOT_FOUND       ? "named symbol not found"
         : e == ILLEGAL_ADDRESS ? "an illegal memory access was encountered"
                                : "emulated device error";
    return SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == SUCCESS           ? "CUDA_SUCCESS"
         : e == NOT_FOUND       ? "CUDA_ERROR_NOT_FOUND"
         : e == ILLEGAL_ADDRESS ? "CUDA_ERROR_ILLEGAL_ADDRESS"
                                : "CUDA_ERROR_INVALID_VALUE";
    return SUCCESS;
}

// Launches and allocations so far (for host-cost measurements).
unsigned long long kvserve_emu_launches() { return g_count.launches; }
unsigned long long kvserve_emu_allocs() { return g_count.allocs; }

// cuBLAS: a handle, its stream, and GemmEx in column-major order (C = alpha op(A) op(B) + beta C)
// for bf16 or f32 operands, accumulated in f32 in k order.
static int g_blas_token;
int cublasCreate_v2(Handle* h) {
    *h = &g_blas_token;
    return 0;
}
int cublasDestroy_v2(Handle) { return 0; }
int cublasSetStream_v2(Handle, Handle) { return 0; }
int cublasSetMathMode(Handle, int) { return 0; }
int cublasSetWorkspace_v2(Handle, void*, size_t) { return 0; }

static float load(const void* p, int type, size_t i) {
    if (type == 0) return ((const float*)p)[i];                          // CUDA_R_32F
    if (type == 14) {                                                    // CUDA_R_16BF
        const unsigned int u = (unsigned int)((const unsigned short*)p)[i] << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    std::fprintf(stderr, "emulated cuBLAS: data type %d\n", type);
    std::abort();
}

int cublasGemmEx(Handle, int ta, int tb, int m, int n, int k, const void* alpha, const void* A,
                 int at, int lda, const void* B, int bt, int ldb, const void* beta, void* C, int ct,
                 int ldc, int compute, int) {
    if (ct != 0 || compute != 68) return 7;  // CUBLAS_STATUS_INVALID_VALUE: f32 out, COMPUTE_32F
    if (g_lost) return 13;                     // CUBLAS_STATUS_EXECUTION_FAILED
    std::lock_guard<std::mutex> g(g_lock);
    g_count.launches++;
    if (g_skip) return 0;
    const float a = *(const float*)alpha, b = *(const float*)beta;
    // op(A) as m rows of k and op(B) as n columns of k, in f32, then plain dot products.
    std::vector<float> ra((size_t)m * k), cb((size_t)n * k);
    for (int i = 0; i < m; ++i)
        for (int l = 0; l < k; ++l)
            ra[(size_t)i * k + l] = load(A, at, ta == 0 ? i + (size_t)l * lda : l + (size_t)i * lda);
    for (int j = 0; j < n; ++j)
        for (int l = 0; l < k; ++l)
            cb[(size_t)j * k + l] = load(B, bt, tb == 0 ? l + (size_t)j * ldb : j + (size_t)l * ldb);
    float* c = (float*)C;
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            const float* x = &ra[(size_t)i * k];
            const float* y = &cb[(size_t)j * k];
            float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // cuBLAS's order is its own too
            int l = 0;
            for (; l + 8 <= k; l += 8)
                for (int v = 0; v < 8; ++v) lanes[v] += x[l + v] * y[l + v];
            float acc = 0.0f;
            for (int v = 0; v < 8; ++v) acc += lanes[v];
            for (; l < k; ++l) acc += x[l] * y[l];
            float& out = c[i + (size_t)j * ldc];
            out = b == 0.0f ? a * acc : a * acc + b * out;
        }
    return 0;
}

}  // extern "C"
