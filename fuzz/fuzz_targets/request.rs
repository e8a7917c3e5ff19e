#![no_main]
mod alloc_guard;

use kvserve::fuzzing::RequestFixture;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// The real model's tokenizer, chat template and limits, loaded once.
fn fixture() -> &'static RequestFixture {
    static F: OnceLock<RequestFixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/SmolLM2-135M-Instruct"
        );
        RequestFixture::from_model_dir(std::path::Path::new(dir)).expect("model text files")
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let _ = f.chat(data);
    let _ = f.completion(data);
});
