//! The parser fuzz targets' CI half (stable toolchain, no cargo-fuzz): every committed seed and
//! every regression input under `fuzz/` replayed through the same entry points as the fuzz
//! targets (`kvserve::fuzzing`), hand-written hostile inputs for each parser, and bounded
//! proptest strategies (structured GGUF headers with hostile counts and lengths, mutated GGUF
//! files, config.json objects, request bodies, templates) with fixed case counts and seed.
//!
//! Every input must give a typed error or success: a panic fails the test, a hang never
//! finishes, and a tracking allocator bounds the largest single allocation each parse makes
//! (so "a count of 2^64 allocated before failing" is caught even when the memory would be
//! handed out lazily).

#[path = "../src/model/gguf/test_writer.rs"]
mod test_writer;

use kvserve::error::ModelError;
use kvserve::fuzzing::{self, RequestFixture};
use kvserve::http::ApiError;
use kvserve::model::chat_template::DEFAULT_MAX_OUTPUT_BYTES;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use serde_json::{json, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use test_writer::*;

// ------------------------------------------------------------------ allocation tracking

/// Records the largest single allocation made on each thread.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| {
        if size > m.get() {
            m.set(size)
        }
    });
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|m| m.set(0));
    let r = f();
    (r, LARGEST.with(|m| m.get()))
}

const MIB: usize = 1 << 20;

/// A GGUF parse may allocate a small multiple of the file size (typed metadata arrays, the
/// tensor table, dequantized tensors: Q2_K expands 84 bytes into 256 f32), never more.
fn gguf_alloc_bound(len: usize) -> usize {
    32 * len + 8 * MIB
}

fn check_gguf(bytes: &[u8]) -> Result<(), ModelError> {
    let (r, largest) = largest_alloc(|| fuzzing::gguf(bytes));
    assert!(
        largest <= gguf_alloc_bound(bytes.len()),
        "a {}-byte GGUF made a {largest}-byte allocation ({r:?})",
        bytes.len()
    );
    r
}

fn check_config(bytes: &[u8]) -> Result<(), ModelError> {
    let (r, largest) = largest_alloc(|| fuzzing::config_json(bytes));
    assert!(
        largest <= 4 * MIB + 8 * bytes.len(),
        "config.json made a {largest}-byte allocation"
    );
    if let Ok(c) = &r {
        // What validation promises the loader.
        assert!(c.num_layers >= 1 && c.num_layers <= 1024, "{c:?}");
        assert!(c.hidden_size >= 1 && c.hidden_size <= 1 << 16, "{c:?}");
        assert!(
            c.num_heads >= 1 && c.num_heads.is_multiple_of(c.num_kv_heads),
            "{c:?}"
        );
        assert!(c.head_dim >= 2 && c.head_dim.is_multiple_of(2), "{c:?}");
        assert!(c.num_heads * c.head_dim <= 1 << 16, "{c:?}");
        assert!(c.vocab_size >= 1 && c.vocab_size <= 1 << 22, "{c:?}");
        assert!(
            c.intermediate_size >= 1 && c.intermediate_size <= 1 << 20,
            "{c:?}"
        );
        assert!(c.rope_theta.is_finite() && c.rope_theta > 0.0, "{c:?}");
    }
    r.map(drop)
}

fn check_template(src: &str) -> Result<String, ModelError> {
    let (r, largest) = largest_alloc(|| fuzzing::chat_template(src));
    // The output cap is 16 MiB and minijinja's fuel bounds the data a render creates; a buffer
    // may double past either once before it trips.
    assert!(
        largest <= 8 * DEFAULT_MAX_OUTPUT_BYTES + 16 * src.len(),
        "template made a {largest}-byte allocation: {src:?}"
    );
    match &r {
        Ok(out) => assert!(out.len() <= DEFAULT_MAX_OUTPUT_BYTES),
        Err(e) => assert!(matches!(e, ModelError::Template(_)), "{e:?}"),
    }
    r
}

// ------------------------------------------------------------------ request fixture

fn fixture() -> &'static RequestFixture {
    static F: OnceLock<RequestFixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct");
        RequestFixture::from_model_dir(&dir)
            .expect("the model's text files (scripts/fetch-model.sh)")
    })
}

/// Both endpoints; a plan that comes back honours every bound.
fn check_request(body: &[u8]) -> [Result<(), ApiError>; 2] {
    let f = fixture();
    let (m, l) = (&f.model, &f.limits);
    let (rs, largest) = largest_alloc(|| [f.chat(body), f.completion(body)]);
    assert!(
        largest <= 4 * MIB + 64 * body.len(),
        "request made a {largest}-byte allocation"
    );
    rs.map(|r| {
        let plan = r?;
        assert!(!plan.prompts.is_empty() && plan.prompts.len() <= l.max_prompts);
        assert!(plan.n >= 1 && plan.n <= l.max_n);
        let mt = plan.stop.max_tokens;
        assert!(mt >= 1 && mt <= l.max_tokens && plan.stop.min_tokens <= mt);
        for p in &plan.prompts {
            assert!(!p.ids.is_empty() && p.ids.len() + mt <= m.max_context);
            assert!(p.ids.iter().all(|&t| (t as usize) < m.vocab_size));
        }
        let s = &plan.sampling;
        assert!((0.0..=2.0).contains(&s.temperature) && s.top_p > 0.0 && s.top_p <= 1.0);
        assert!(s.top_k <= m.vocab_size && s.logit_bias.len() <= l.max_logit_bias);
        assert!(s
            .logit_bias
            .iter()
            .all(|&(t, b)| (t as usize) < m.vocab_size && b.abs() <= 100.0));
        assert!(plan.stops.len() <= l.max_stop_sequences);
        assert!(plan
            .stops
            .iter()
            .all(|s| !s.is_empty() && s.len() <= l.max_stop_bytes));
        assert!(plan
            .stop
            .stop_ids
            .iter()
            .all(|&t| (t as usize) < m.vocab_size));
        assert!(plan.logprobs.is_none_or(|k| k <= l.max_top_logprobs));
        Ok(())
    })
}

// ------------------------------------------------------------------ corpus replay

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

const TARGETS: [&str; 6] = [
    "gguf",
    "config_json",
    "safetensors",
    "tokenizer",
    "chat_template",
    "request",
];

/// Runs one input through its target's entry point, as the fuzz target does.
fn replay(target: &str, data: &[u8]) {
    match target {
        "gguf" => drop(check_gguf(data)),
        "config_json" => drop(check_config(data)),
        "safetensors" => {
            let (r, largest) = largest_alloc(|| fuzzing::safetensors(data));
            assert!(largest <= 8 * data.len() + 4 * MIB, "{r:?}");
        }
        "tokenizer" => {
            let (r, largest) = largest_alloc(|| fuzzing::tokenizer(data));
            assert!(largest <= 64 * data.len() + 32 * MIB, "{r:?}");
        }
        "chat_template" => {
            if let Ok(src) = std::str::from_utf8(data) {
                drop(check_template(src));
            }
        }
        "request" => drop(check_request(data)),
        other => panic!("unknown fuzz target directory `{other}`"),
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Every committed seed (`fuzz/corpus/<target>/`) and every input that once crashed, hung or
/// over-allocated (`fuzz/regressions/<target>/`), through its target's entry point.
#[test]
fn committed_corpora_and_regressions_replay() {
    let mut total_bytes = 0;
    for target in TARGETS {
        let seeds = files_under(&fuzz_dir().join("corpus").join(target));
        assert!(!seeds.is_empty(), "no seeds for fuzz target `{target}`");
        let regressions = files_under(&fuzz_dir().join("regressions").join(target));
        for path in seeds.iter().chain(&regressions) {
            let data = std::fs::read(path).unwrap();
            total_bytes += data.len();
            eprintln!("replaying {}", path.display());
            replay(target, &data);
        }
    }
    assert!(
        total_bytes < 2 * MIB,
        "committed fuzz inputs are {total_bytes} bytes"
    );
    // Every regression directory belongs to a target.
    for dir in files_or_dirs(&fuzz_dir().join("regressions")) {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            TARGETS.contains(&name.as_str()),
            "unknown regression dir {name}"
        );
    }
}

fn files_or_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// The seeds are not all rejections: the valid ones parse all the way through.
#[test]
fn valid_seeds_parse() {
    let seed = |t: &str, n: &str| std::fs::read(fuzz_dir().join("corpus").join(t).join(n)).unwrap();
    check_gguf(&seed("gguf", "tiny_llama.gguf")).unwrap();
    check_config(&seed("config_json", "smollm2.json")).unwrap();
    check_config(&seed("config_json", "qwen2_llama3_rope.json")).unwrap();
    fuzzing::safetensors(&seed("safetensors", "three_dtypes.safetensors")).unwrap();
    fuzzing::tokenizer(&seed("tokenizer", "tiny_bytelevel_bpe.json")).unwrap();
    let src = String::from_utf8(seed("chat_template", "smollm2.jinja")).unwrap();
    let out = check_template(&src).unwrap();
    assert!(out.ends_with("<|im_start|>assistant\n"), "{out}");
    let [chat, completion] = check_request(&seed("request", "chat_full.json"));
    chat.unwrap();
    assert!(completion.is_err());
    let [chat, completion] = check_request(&seed("request", "completion_tokens.json"));
    assert!(chat.is_err());
    completion.unwrap();
}

// ------------------------------------------------------------------ hostile GGUF

fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    put_u32(&mut b, 3);
    put_u64(&mut b, n_tensors);
    put_u64(&mut b, n_kv);
    b
}

fn format_err(r: Result<(), ModelError>, needle: &str) {
    match r {
        Err(ModelError::Format { msg, .. }) | Err(ModelError::Unsupported { msg, .. }) => {
            assert!(msg.contains(needle), "`{msg}` lacks `{needle}`")
        }
        other => panic!("expected a format error containing `{needle}`, got {other:?}"),
    }
}

#[test]
fn hostile_gguf_counts_lengths_offsets_and_shapes() {
    // Counts near u64::MAX: refused from the bytes left, before any Vec::with_capacity.
    for n in [u64::MAX, u64::MAX / 24, 1 << 40] {
        format_err(check_gguf(&header(n, 0)), "tensor count");
        format_err(check_gguf(&header(0, n)), "metadata count");
    }
    // A key / string value / array length near u64::MAX.
    let mut b = header(0, 1);
    put_u64(&mut b, u64::MAX);
    b.extend_from_slice(b"key and some more bytes");
    format_err(check_gguf(&b), "string length");
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    put_u32(&mut b, T_STRING);
    put_u64(&mut b, u64::MAX - 3);
    format_err(check_gguf(&b), "string length");
    for elem in [T_U8, T_U64, T_STRING, T_ARRAY] {
        let mut b = header(0, 1);
        put_str(&mut b, "k");
        put_u32(&mut b, T_ARRAY);
        put_u32(&mut b, elem);
        put_u64(&mut b, u64::MAX);
        format_err(check_gguf(&b), "array length");
    }
    // Arrays of arrays nested past the limit.
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    put_u32(&mut b, T_ARRAY);
    for _ in 0..8 {
        put_u32(&mut b, T_ARRAY);
        put_u64(&mut b, 1);
    }
    b.extend_from_slice(&[0; 64]);
    format_err(check_gguf(&b), "nested too deeply");

    let tensor = |dims: &[u64], ty: u32, offset: u64| {
        let mut b = header(1, 0);
        put_str(&mut b, "blk.0.attn_q.weight");
        put_u32(&mut b, dims.len() as u32);
        for &d in dims {
            put_u64(&mut b, d);
        }
        put_u32(&mut b, ty);
        put_u64(&mut b, offset);
        b.resize(b.len().next_multiple_of(32) + 64, 0);
        b
    };
    // Data past the end; offsets that overflow when added to the data start.
    // Exactly filling the 64 data bytes is fine (the file then fails for lack of metadata).
    kvserve::model::gguf::GgufFile::from_bytes(tensor(&[16], 0, 0), Path::new("t.gguf")).unwrap();
    format_err(check_gguf(&tensor(&[17], 0, 0)), "past the end");
    format_err(check_gguf(&tensor(&[4], 0, u64::MAX - 8)), "past the end");
    format_err(check_gguf(&tensor(&[4], 0, 1 << 40)), "past the end");
    // Dimension products that overflow u64, or only the byte size.
    format_err(check_gguf(&tensor(&[1 << 32, 1 << 32], 0, 0)), "overflow");
    format_err(check_gguf(&tensor(&[u64::MAX, 2], 0, 0)), "overflow");
    format_err(check_gguf(&tensor(&[1 << 62], 0, 0)), "byte size overflows");
    format_err(check_gguf(&tensor(&[1 << 40], 0, 0)), "past the end");
    format_err(check_gguf(&tensor(&[1, 1, 1, 1, 1], 0, 0)), "dimensions");
    // Unknown ggml types, and known ones we cannot dequantize.
    format_err(check_gguf(&tensor(&[4], 999, 0)), "unknown ggml type");
    format_err(check_gguf(&tensor(&[4], u32::MAX, 0)), "unknown ggml type");
    // Q4_0 rows must be whole blocks.
    format_err(check_gguf(&tensor(&[33], 2, 0)), "block");
}

#[test]
fn hostile_gguf_model_metadata() {
    let with = |f: &dyn Fn(&mut GgufBuilder)| {
        let mut g = tiny_llama();
        f(&mut g);
        check_gguf(&g.build())
    };
    let set = |key: &'static str, v: u32| {
        move |g: &mut GgufBuilder| {
            let mut b = Vec::new();
            put_u32(&mut b, v);
            for kv in g.kvs.iter_mut().filter(|kv| kv.0 == key) {
                kv.2 = b.clone();
            }
        }
    };
    with(&|_| {}).unwrap();
    // Heads that do not divide the hidden size (no explicit key length).
    format_err(with(&set("llama.embedding_length", 9)), "not a multiple");
    format_err(with(&set("llama.attention.head_count", 0)), "is 0");
    format_err(
        with(&set("llama.block_count", u32::MAX)),
        "implausibly large",
    );
    format_err(
        with(&set("llama.feed_forward_length", u32::MAX)),
        "implausibly large",
    );
    format_err(
        with(&set("llama.context_length", 0)),
        "max_position_embeddings",
    );
}

// ------------------------------------------------------------------ hostile config.json

#[test]
fn hostile_configs_are_rejected_before_allocating() {
    let smol: Value = serde_json::from_slice(
        &std::fs::read(fuzz_dir().join("corpus/config_json/smollm2.json")).unwrap(),
    )
    .unwrap();
    let with = |patch: Value| {
        let mut v = smol.clone();
        for (k, x) in patch.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        check_config(v.to_string().as_bytes())
    };
    with(json!({})).unwrap();
    let tera = 1_000_000_000_000u64;
    for (patch, needle) in [
        (json!({"num_hidden_layers": tera}), "implausibly large"),
        (json!({"hidden_size": tera}), "implausibly large"),
        (json!({"vocab_size": tera}), "implausibly large"),
        (json!({"intermediate_size": tera}), "implausibly large"),
        (json!({"head_dim": tera}), "implausibly large"),
        (
            json!({"num_attention_heads": tera, "num_key_value_heads": tera}),
            "large",
        ),
        (
            json!({"max_position_embeddings": tera}),
            "max_position_embeddings",
        ),
        (
            json!({"max_position_embeddings": 0}),
            "max_position_embeddings",
        ),
        (json!({"num_attention_heads": 0}), "zero heads"),
        (json!({"num_key_value_heads": 0}), "num_key_value_heads"),
        (json!({"num_key_value_heads": 2}), "not a multiple"),
        (json!({"num_hidden_layers": 0}), "zero"),
        (
            json!({"head_dim": null, "num_attention_heads": 7}),
            "not a multiple",
        ),
        (json!({"head_dim": 63}), "even"),
        (json!({"rope_theta": -1.0}), "rope_theta"),
        (json!({"rope_theta": 0.0}), "rope_theta"),
        (json!({"rms_norm_eps": -1.0}), "rms_norm_eps"),
        (
            json!({"rope_scaling": {"type": "linear", "factor": 0.0}}),
            "rope scaling",
        ),
        (
            json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
            "rope scaling",
        ),
        (
            json!({"rope_scaling": {"type": "yarn", "factor": 2.0}}),
            "yarn",
        ),
        (json!({"vocab_size": -1}), "invalid value"),
        (json!({"hidden_size": 1e300}), "invalid type"),
        (
            json!({"architectures": ["GPT2LMHeadModel"]}),
            "architecture",
        ),
    ] {
        format_err(with(patch.clone()), needle);
    }
    for bad in [
        "",
        "{",
        "null",
        "[]",
        "\u{0}",
        "{\"vocab_size\": 18446744073709551616}",
    ] {
        assert!(check_config(bad.as_bytes()).is_err(), "{bad:?}");
    }
}

// ------------------------------------------------------------------ hostile templates

/// Renders on a thread with tokio's 2 MiB worker stack, as the HTTP handlers do.
fn render_on_small_stack(src: String) -> Result<String, ModelError> {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || check_template(&src))
        .unwrap()
        .join()
        .expect("rendering must not panic or overflow the stack")
}

#[test]
fn hostile_templates_fail_with_a_bounded_error() {
    for src in [
        // 10^9 iterations, flat and nested.
        "{% for i in range(1000000000) %}x{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
        // A 1 GB string in one expression, by repetition and by doubling.
        "{{ 'x' * 1000000000 }}",
        "{% set s = 'x' * 1000000 %}{{ s * 1000 }}",
        "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        "{% for i in range(64) %}{% set x = 'y' * 16777216 %}{{ x }}{% endfor %}",
        // Huge output through many small writes.
        "{% for i in range(100000000) %}{{ messages }}{% endfor %}",
        // A 1 GB list; its JSON with an absurd indent.
        "{{ ([1] * 1000000000)|length }}",
        "{{ messages|tojson(indent=1000000000000) }}",
        "{{ range(100000)|list|tojson(indent=200) }}",
        "{{ [[[[[[[[[[[[1]]]]]]]]]]]]|tojson(indent=' ' * 300) }}",
        // Unbounded recursion.
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% macro f(n) %}{{ f(n + 1) ~ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
        "{{ raise_exception('no') }}",
        "{{ strftime_now('%A' * 10000000) }}",
    ] {
        let r = render_on_small_stack(src.to_string());
        assert!(r.is_err(), "{src}: rendered {} bytes", r.unwrap().len());
    }
    // Deep nesting in the source itself: the parser's recursion limit, not the stack.
    let deep = format!("{{{{ {}1{} }}}}", "(".repeat(5000), ")".repeat(5000));
    assert!(render_on_small_stack(deep).is_err());
    // Large but legitimate output under the cap still renders.
    let out =
        render_on_small_stack("{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}".into())
            .unwrap();
    assert_eq!(out.len(), 1_000_000);
}

// ------------------------------------------------------------------ proptest strategies

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(0x6b76_7365_7276_6538),
        failure_persistence: None,
        ..Config::default()
    })
}

/// Numbers around the edges that hostile files use.
fn edgy_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..8,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX / 2),
        1 => Just(u64::MAX - 7),
        1 => Just(1u64 << 32),
        1 => Just(1u64 << 40),
        1 => Just(1u64 << 62),
        2 => any::<u64>(),
    ]
}

/// One metadata value's encoding: a type id and a payload whose counts and lengths may lie.
fn gguf_kv() -> impl Strategy<Value = (String, Vec<u8>)> {
    let key = "[a-z.]{0,12}";
    let value = prop_oneof![
        // Scalars of any type id, including unknown ones.
        (0u32..16, proptest::collection::vec(any::<u8>(), 0..9)).prop_map(|(ty, p)| {
            let mut b = ty.to_le_bytes().to_vec();
            b.extend(p);
            b
        }),
        // A string with a lying length.
        (edgy_u64(), "[ -~]{0,8}").prop_map(|(len, s)| {
            let mut b = T_STRING.to_le_bytes().to_vec();
            b.extend(len.to_le_bytes());
            b.extend(s.as_bytes());
            b
        }),
        // An array with a lying count, of any element type, possibly nested.
        (
            0u32..14,
            edgy_u64(),
            0u32..3,
            proptest::collection::vec(any::<u8>(), 0..48)
        )
            .prop_map(|(elem, n, nest, p)| {
                let mut b = T_ARRAY.to_le_bytes().to_vec();
                for _ in 0..nest {
                    b.extend(T_ARRAY.to_le_bytes());
                    b.extend(1u64.to_le_bytes());
                }
                b.extend(elem.to_le_bytes());
                b.extend(n.to_le_bytes());
                b.extend(p);
                b
            }),
    ];
    (key, value).prop_map(|(k, v)| {
        let mut b = Vec::new();
        put_str(&mut b, &k);
        b.extend(v);
        (k, b)
    })
}

/// One tensor-table entry with hostile dims, type and offset.
fn gguf_tensor() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just("token_embd.weight".to_string()), "[a-z_.0-9]{0,20}"],
        prop_oneof![3 => 0u32..5, 1 => Just(5u32), 1 => any::<u32>()],
        proptest::collection::vec(edgy_u64(), 0..5),
        prop_oneof![4 => 0u32..32, 1 => any::<u32>()],
        edgy_u64(),
    )
        .prop_map(|(name, n_dims, dims, ty, offset)| {
            let mut b = Vec::new();
            put_str(&mut b, &name);
            put_u32(&mut b, n_dims);
            for d in dims.iter().take(n_dims as usize) {
                put_u64(&mut b, *d);
            }
            put_u32(&mut b, ty);
            put_u64(&mut b, offset);
            b
        })
}

#[test]
fn proptest_structured_gguf_headers() {
    let strategy = (
        prop_oneof![Just(3u32), Just(2u32), any::<u32>()],
        prop_oneof![3 => Just(None), 1 => edgy_u64().prop_map(Some)],
        prop_oneof![3 => Just(None), 1 => edgy_u64().prop_map(Some)],
        proptest::collection::vec(gguf_kv(), 0..6),
        proptest::collection::vec(gguf_tensor(), 0..4),
        proptest::collection::vec(any::<u8>(), 0..256),
        any::<prop::sample::Index>(),
        any::<bool>(),
    );
    runner(512)
        .run(
            &strategy,
            |(version, n_t, n_kv, kvs, tensors, data, cut, truncate)| {
                let mut b = b"GGUF".to_vec();
                put_u32(&mut b, version);
                put_u64(&mut b, n_t.unwrap_or(tensors.len() as u64));
                put_u64(&mut b, n_kv.unwrap_or(kvs.len() as u64));
                for (_, kv) in &kvs {
                    b.extend(kv);
                }
                for t in &tensors {
                    b.extend(t);
                }
                b.resize(b.len().next_multiple_of(32), 0);
                b.extend(data);
                if truncate {
                    b.truncate(cut.index(b.len() + 1));
                }
                let _ = check_gguf(&b);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn proptest_mutated_gguf_files() {
    let valid = tiny_llama().build();
    let len = valid.len();
    let strategy = (
        proptest::collection::vec((any::<prop::sample::Index>(), edgy_u64(), 0usize..3), 1..4),
        proptest::option::of(any::<prop::sample::Index>()),
    );
    runner(192)
        .run(&strategy, |(edits, cut)| {
            let mut b = valid.clone();
            for (at, v, width) in edits {
                // Overwrite 1, 4 or 8 bytes anywhere (counts, lengths, type ids, dims, data).
                let w = [1, 4, 8][width];
                let at = at.index(len - w);
                b[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            if let Some(c) = cut {
                b.truncate(c.index(len));
            }
            let _ = check_gguf(&b);
            Ok(())
        })
        .unwrap();
}

/// JSON values around the edges of what the parsers accept.
fn edgy_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-3i64..70).prop_map(Value::from),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(i64::MAX),
            Just(i64::MIN),
            Just(1_000_000_000_000)
        ]
        .prop_map(Value::from),
        Just(json!(u64::MAX)),
        (-1e6f64..1e6).prop_map(Value::from),
        Just(json!(1e300)),
        Just(json!(f64::MIN_POSITIVE)),
        "[ -~]{0,12}".prop_map(Value::from),
        Just(json!("<|im_start|>user")),
        Just(json!("bf16")),
        Just(json!("kivi4+window:64")),
        Just(json!("user")),
        Just(json!("assistant")),
        Just(json!("system")),
        Just(json!("text")),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{1,8}|[0-9]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_object(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    proptest::collection::vec((proptest::sample::select(keys), edgy_json()), 0..10)
        .prop_map(|kvs| Value::Object(kvs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

#[test]
fn proptest_config_objects() {
    let keys: &'static [&'static str] = &[
        "architectures",
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "eos_token_id",
    ];
    let base = json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4});
    runner(384)
        .run(&json_object(keys), |patch| {
            let mut v = base.clone();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            let _ = check_config(v.to_string().as_bytes());
            Ok(())
        })
        .unwrap();
}

#[test]
fn proptest_request_bodies() {
    let keys: &'static [&'static str] = &[
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "stop",
        "stop_token_ids",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "echo",
        "stream",
        "stream_options",
        "seed",
        "kv_policy",
        "cache_salt",
        "prompt_cache_key",
        "min_tokens",
        "best_of",
        "suffix",
        "response_format",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "presence_penalty",
        "repetition_penalty",
        "priority",
    ];
    let messages = proptest::collection::vec(
        (
            prop_oneof![
                Just("user"),
                Just("assistant"),
                Just("system"),
                Just("developer"),
                Just("tool"),
                Just("bot")
            ],
            edgy_json(),
        ),
        0..4,
    )
    .prop_map(|ms| {
        Value::from(
            ms.into_iter()
                .map(|(r, c)| json!({"role": r, "content": c}))
                .collect::<Vec<_>>(),
        )
    });
    let prompt = prop_oneof![
        "[ -~]{0,24}".prop_map(Value::from),
        proptest::collection::vec(0u32..50_000, 0..6).prop_map(|v| json!(v)),
        proptest::collection::vec(proptest::collection::vec(0u32..50_000, 0..4), 0..4)
            .prop_map(|v| json!(v)),
        edgy_json(),
    ];
    let strategy = (json_object(keys), messages, prompt, any::<bool>());
    let f = fixture();
    assert!(f
        .chat(br#"{"messages":[{"role":"user","content":"hi"}]}"#)
        .is_ok());
    runner(384)
        .run(&strategy, |(mut body, messages, prompt, raw)| {
            if !body.as_object().unwrap().contains_key("messages") {
                body["messages"] = messages;
            }
            if !body.as_object().unwrap().contains_key("prompt") {
                body["prompt"] = prompt;
            }
            let mut bytes = body.to_string().into_bytes();
            if raw {
                // Not-quite-JSON as well: cut it short.
                bytes.truncate(bytes.len() / 2);
            }
            let _ = check_request(&bytes);
            Ok(())
        })
        .unwrap();
}

#[test]
fn proptest_random_templates() {
    let fragments: &'static [&'static str] = &[
        "{% for m in messages %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}",
        "{% else %}",
        "{% endif %}",
        "{{ m.content }}",
        "{{ m['role'] }}",
        "{{ messages[0].content|trim }}",
        "{{ bos_token }}",
        "{{ eos_token ~ 'x' }}",
        "{% set ns = namespace(x='ab') %}",
        "{% set ns.x = ns.x ~ ns.x %}",
        "{{ ns.x }}",
        "{% for i in range(1000) %}",
        "{% for i in range(100000) %}",
        "{{ 'ab' * 100000 }}",
        "{{ messages|tojson(indent=4) }}",
        "{{ messages|tojson(indent=100000) }}",
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}",
        "{{ f(1) }}",
        "{% break %}",
        "{{ raise_exception('x') }}",
        "{{ strftime_now('%Y-%m-%d') }}",
        "{{ loop.index }}",
        "{{ (messages * 1000)|length }}",
        "{% generation %}",
        "{% endgeneration %}",
        "{{",
        "}}",
        "{%",
        "%}",
        "text\n",
        "{{ 10 ** 100 }}",
        "{{ 'x'.center(1000000000) }}",
        "{{ '%s'|format(messages) }}",
    ];
    let strategy = proptest::collection::vec(proptest::sample::select(fragments), 0..10);
    runner(160)
        .run(&strategy, |parts| {
            let _ = check_template(&parts.concat());
            Ok(())
        })
        .unwrap();
}
