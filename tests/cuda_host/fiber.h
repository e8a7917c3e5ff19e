// Fibers for the CTAs of the emulated device and the host harnesses (shim.h with HOST_FIBERS):
// every CUDA thread of a CTA is a fiber with a stack of its own on the launching OS thread, run by
// `fiber_run_cta`; a barrier wait hands over to the first fiber that can go on. A switch saves the callee-saved registers and the
// stack pointer and loads another's (x86-64 System V), a few nanoseconds against the
// microseconds of an OS thread switch, and a shuffle is two barrier waits of its warp.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sys/mman.h>
#include <vector>

#if !defined(__x86_64__)
#error "the emulated device's fibers switch stacks in x86-64 assembly"
#endif

// Under AddressSanitizer (KVSERVE_HOST_SANITIZE=address, tests/cuda_host/host_run.rs) every stack
// switch is announced to it, or it would take a fiber's stack for an overflow of the thread's.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define KVS_ASAN 1
#else
#define KVS_ASAN 0
#endif

// kvs_fiber_switch(save, load): pushes the callee-saved registers, stores the stack pointer in
// *save, loads `load` and pops the registers saved there. Weak: every translation unit that
// includes this header defines it, the linker keeps one.
extern "C" void kvs_fiber_switch(void** save, void* load);
asm(R"(
    .text
    .weak kvs_fiber_switch
    .type kvs_fiber_switch,@function
kvs_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size kvs_fiber_switch, .-kvs_fiber_switch
)");

struct FiberState {
    void* sched = nullptr;          // the scheduler's saved stack pointer
    std::vector<void*> sp;          // each fiber's saved stack pointer
    std::vector<char> done;
    // The barrier generation each fiber waits to see change (null: not waiting): the scheduler
    // skips a fiber whose barrier has not opened instead of switching to it to find out.
    std::vector<const unsigned long*> wait_on;
    std::vector<unsigned long> wait_gen;
    unsigned from = 0;              // no fiber before this place in the run order can run
    unsigned cur = 0, alive = 0;
    std::function<void()> body;     // the CTA's kernel call, run by every fiber
    char* stacks = nullptr;
    unsigned capacity = 0;          // fibers the stacks hold
    // AddressSanitizer's bookkeeping of the switches: the scheduler's stack as the first switch
    // into a fiber reported it, and the fake-stack handles each side keeps across a switch.
    const void* sched_bottom = nullptr;
    size_t sched_size = 0;
    void* sched_fake = nullptr;
    std::vector<void*> fake;
    // The order the next CTA's threads run in; the first CTA's from the environment, so that a
    // harness that runs one CTA per process can be run in both orders (tests/cuda_host/host_run.rs).
    bool descending = std::getenv("KVSERVE_FIBERS_DESCENDING") != nullptr;
    static constexpr size_t STACK = 256 << 10;
};
inline FiberState g_fib;

// A fiber has just been switched to (first `fake` null: its first run).
inline void fiber_arrived(void* fake) {
#if KVS_ASAN
    __sanitizer_finish_switch_fiber(fake, &g_fib.sched_bottom, &g_fib.sched_size);
#else
    (void)fake;
#endif
}

// A fiber goes back to the scheduler: `fake` keeps its fake stack (null: it ends).
inline void fiber_leaving(void** fake) {
#if KVS_ASAN
    __sanitizer_start_switch_fiber(fake, g_fib.sched_bottom, g_fib.sched_size);
#else
    (void)fake;
#endif
}

inline void fiber_yield() {
    const unsigned me = g_fib.cur;
    fiber_leaving(&g_fib.fake[me]);
    kvs_fiber_switch(&g_fib.sp[me], g_fib.sched);
    fiber_arrived(g_fib.fake[me]);
}

// Where a fiber starts: runs the body, marks itself done and goes back for good.
inline void fiber_entry() {
    fiber_arrived(nullptr);
    g_fib.body();
    g_fib.done[g_fib.cur] = 1;
    --g_fib.alive;
    void* gone;
    fiber_leaving(nullptr);
    kvs_fiber_switch(&gone, g_fib.sched);
    __builtin_trap();
}

// A barrier of `n` fibers: the last to arrive opens it; the others wait, yielding.
struct FiberBarrier {
    explicit FiberBarrier(unsigned n) : n(n) {}
    void arrive_and_wait() {
        const unsigned long g = gen;
        if (++count == n) {
            count = 0;
            ++gen;
            g_fib.from = 0;  // the fibers it held may come before the scheduler's place
            return;
        }
        g_fib.wait_on[g_fib.cur] = &gen;
        g_fib.wait_gen[g_fib.cur] = g;
        while (gen == g) fiber_yield();
        g_fib.wait_on[g_fib.cur] = nullptr;
    }
    unsigned n, count = 0;
    unsigned long gen = 0;
};

// Runs `f` once per thread of a CTA of `threads` fibers. The scheduler always resumes the first
// fiber in the run order that can go on (not finished, not waiting at a barrier that is still
// shut), so one warp runs as far as it can before the next starts: a warp reads shared memory
// before a later warp writes it, or overwrites it before a later warp has read it, wherever a
// barrier is missing between the two. Every other CTA runs in the opposite order (last thread
// first), which puts the later warps ahead instead. If every live fiber waits at a shut
// barrier, the CTA could never finish on a GPU either: that stops the process with a message.
// `set` is told which thread runs before each switch to it.
template <typename Set, typename F>
void fiber_run_cta(unsigned threads, Set set, F& f) {
    if (threads > g_fib.capacity) {
        if (g_fib.stacks) munmap(g_fib.stacks, g_fib.capacity * FiberState::STACK);
        void* m = mmap(nullptr, threads * FiberState::STACK, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) __builtin_trap();
        g_fib.stacks = (char*)m;
        g_fib.capacity = threads;
    }
    g_fib.body = [&f] { f(); };
    g_fib.sp.assign(threads, nullptr);
    g_fib.done.assign(threads, 0);
    g_fib.wait_on.assign(threads, nullptr);
    g_fib.wait_gen.assign(threads, 0);
    g_fib.fake.assign(threads, nullptr);
#if KVS_ASAN
    // The last CTA's fibers left their frames' poison on these stacks when they ended.
    __asan_unpoison_memory_region(g_fib.stacks, (size_t)threads * FiberState::STACK);
#endif
    for (unsigned t = 0; t < threads; ++t) {
        // 16-byte aligned top; after the 6 registers and `ret`, the entry sees rsp = 8 mod 16,
        // as after a call.
        auto top = (uintptr_t)(g_fib.stacks + (size_t)(t + 1) * FiberState::STACK) & ~(uintptr_t)15;
        void** sp = (void**)top;
        *--sp = nullptr;                  // fiber_entry's return address: never used
        *--sp = (void*)&fiber_entry;      // where `ret` goes
        for (int r = 0; r < 6; ++r) *--sp = nullptr;
        g_fib.sp[t] = sp;
    }
    g_fib.alive = threads;
    g_fib.from = 0;
    const bool down = g_fib.descending;
    g_fib.descending = !down;
    while (g_fib.alive > 0) {
        unsigned i = g_fib.from;
        for (; i < threads; ++i) {
            const unsigned t = down ? threads - 1 - i : i;
            if (!g_fib.done[t] && !(g_fib.wait_on[t] && *g_fib.wait_on[t] == g_fib.wait_gen[t])) break;
        }
        if (i == threads) {
            std::fprintf(stderr, "emulated CTA deadlock: %u threads wait at barriers that cannot open\n",
                         g_fib.alive);
            std::abort();
        }
        g_fib.from = i;
        const unsigned t = down ? threads - 1 - i : i;
        g_fib.cur = t;
        set(t);
#if KVS_ASAN
        __sanitizer_start_switch_fiber(&g_fib.sched_fake, g_fib.stacks + (size_t)t * FiberState::STACK,
                                       FiberState::STACK);
#endif
        kvs_fiber_switch(&g_fib.sched, g_fib.sp[t]);
#if KVS_ASAN
        __sanitizer_finish_switch_fiber(g_fib.sched_fake, nullptr, nullptr);
#endif
    }
}
