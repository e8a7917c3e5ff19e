//! Included by every target: aborts (a crash libFuzzer keeps) on any single allocation larger
//! than 256 MiB, so "allocates gigabytes from a hostile count" is found even when the memory
//! would be handed out lazily and never touched (which RSS limits miss).

use std::alloc::{GlobalAlloc, Layout, System};

const LIMIT: usize = 256 << 20;

struct Guard;

unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

fn check(size: usize) {
    if size > LIMIT {
        // No formatting machinery (it may allocate): a fixed message, then abort.
        let msg = b"alloc_guard: single allocation over 256 MiB\n";
        unsafe { libc_write(2, msg.as_ptr(), msg.len()) };
        std::process::abort();
    }
}

extern "C" {
    #[link_name = "write"]
    fn libc_write(fd: i32, buf: *const u8, n: usize) -> isize;
}

#[global_allocator]
static GUARD: Guard = Guard;
