#![no_main]
mod alloc_guard;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kvserve::fuzzing::gguf(data);
});
