#![no_main]
mod alloc_guard;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(src) = std::str::from_utf8(data) {
        let _ = kvserve::fuzzing::chat_template(src);
    }
});
