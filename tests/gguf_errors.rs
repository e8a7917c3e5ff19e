//! Bad GGUF input through the public API: every malformed file is an error that names the file
//! and the problem; nothing panics and nothing allocates from an absurd count.

#[path = "../src/model/gguf/test_writer.rs"]
mod test_writer;

use kvserve::error::ModelError;
use kvserve::model::gguf::GgufFile;
use kvserve::model::TensorSource;
use std::path::{Path, PathBuf};
use test_writer::*;

struct Tmp {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write(name: &str, bytes: &[u8]) -> Tmp {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    Tmp { _dir: dir, path }
}

/// Opens `bytes` as a file and expects an error whose message names the file and contains
/// every one of `needles`.
fn open_err(bytes: &[u8], needles: &[&str]) -> ModelError {
    let tmp = write("model.gguf", bytes);
    let e = match GgufFile::open(&tmp.path) {
        Ok(_) => panic!("expected an error containing {needles:?}"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(msg.contains(&tmp.path.display().to_string()), "{msg}");
    for n in needles {
        assert!(msg.contains(n), "`{msg}` lacks `{n}`");
    }
    e
}

/// Header: magic, version, tensor count, kv count.
fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    put_u32(&mut b, version);
    put_u64(&mut b, n_tensors);
    put_u64(&mut b, n_kv);
    b
}

fn pad(mut b: Vec<u8>, len: usize) -> Vec<u8> {
    b.resize(b.len().max(len), 0);
    b
}

#[test]
fn missing_file() {
    let p = Path::new("/nonexistent/dir/model.gguf");
    let e = GgufFile::open(p).err().unwrap();
    assert!(matches!(e, ModelError::Io { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/dir/model.gguf"), "{e}");
}

#[test]
fn wrong_magic() {
    let mut b = pad(header(3, 0, 0), 64);
    b[..4].copy_from_slice(b"GGML");
    let e = open_err(&b, &["not a GGUF file"]);
    assert!(matches!(e, ModelError::Format { .. }));
    // A safetensors file handed over by mistake.
    open_err(
        &pad(vec![0x10, 0, 0, 0, 0, 0, 0, 0, b'{'], 64),
        &["not a GGUF file"],
    );
}

#[test]
fn unsupported_versions() {
    let e = open_err(&pad(header(1, 0, 0), 64), &["version 1"]);
    assert!(matches!(e, ModelError::Unsupported { .. }));
    open_err(&pad(header(4, 0, 0), 64), &["version 4"]);
    open_err(&pad(header(3u32.swap_bytes(), 0, 0), 64), &["big-endian"]);
}

#[test]
fn truncated_header() {
    open_err(b"GGUF\x03\x00", &["truncated header"]);
    open_err(b"", &["truncated header"]);
    // A metadata key cut short, and a value cut short.
    let mut b = header(3, 0, 1);
    put_str(&mut b, "general.architecture");
    open_err(&b[..b.len() - 5], &["metadata key", "string length 20"]);
    let mut b = header(3, 0, 1);
    put_str(&mut b, "general.file_type");
    put_u32(&mut b, T_U64);
    put_u32(&mut b, 7);
    open_err(&b, &["truncated", "general.file_type"]);
    // Header complete but the promised metadata is not there.
    let e = open_err(&header(3, 0, 1), &["metadata count 1", "impossible"]);
    assert!(matches!(e, ModelError::Format { .. }));
}

#[test]
fn absurd_counts() {
    open_err(
        &pad(header(3, u64::MAX, 0), 64),
        &["tensor count", "impossible"],
    );
    open_err(&pad(header(3, 1 << 40, 0), 64), &["tensor count"]);
    open_err(
        &pad(header(3, 0, u64::MAX), 64),
        &["metadata count", "impossible"],
    );
}

#[test]
fn absurd_string_length() {
    let mut b = header(3, 0, 1);
    put_u64(&mut b, u64::MAX - 3); // key length
    let b = pad(b, 100);
    open_err(&b, &["string length", "exceeds"]);

    // In a value, too.
    let mut b = header(3, 0, 1);
    put_str(&mut b, "general.name");
    put_u32(&mut b, T_STRING);
    put_u64(&mut b, 1 << 50);
    open_err(&pad(b, 100), &["general.name", "string length"]);
}

#[test]
fn absurd_array_length() {
    let mut b = header(3, 0, 1);
    put_str(&mut b, "tokenizer.ggml.tokens");
    put_u32(&mut b, T_ARRAY);
    put_u32(&mut b, T_STRING);
    put_u64(&mut b, u64::MAX / 2);
    open_err(&pad(b, 200), &["tokenizer.ggml.tokens", "array length"]);

    let mut b = header(3, 0, 1);
    put_str(&mut b, "x");
    put_u32(&mut b, T_ARRAY);
    put_u32(&mut b, T_U64);
    put_u64(&mut b, 1000);
    open_err(&pad(b, 200), &["array length 1000"]);

    // Unknown value and element types.
    let mut b = header(3, 0, 1);
    put_str(&mut b, "x");
    put_u32(&mut b, 77);
    open_err(&pad(b, 64), &["unknown value type 77"]);
}

#[test]
fn deeply_nested_arrays_are_rejected() {
    let mut b = header(3, 0, 1);
    put_str(&mut b, "nest");
    put_u32(&mut b, T_ARRAY);
    for _ in 0..10 {
        put_u32(&mut b, T_ARRAY);
        put_u64(&mut b, 1);
    }
    open_err(&pad(b, 400), &["nested too deeply"]);
}

/// One tensor info entry (no metadata), followed by `data_len` bytes of data.
fn one_tensor(name: &str, dims: &[u64], ty: u32, offset: u64, data_len: usize) -> Vec<u8> {
    let mut b = header(3, 1, 0);
    put_str(&mut b, name);
    put_u32(&mut b, dims.len() as u32);
    for &d in dims {
        put_u64(&mut b, d);
    }
    put_u32(&mut b, ty);
    put_u64(&mut b, offset);
    let start = b.len().next_multiple_of(32);
    b.resize(start + data_len, 0);
    b
}

#[test]
fn absurd_dims() {
    open_err(
        &one_tensor("blk.0.attn_q.weight", &[1, 1, 1, 1, 1], 0, 0, 64),
        &["blk.0.attn_q.weight", "5 dimensions"],
    );
    open_err(
        &one_tensor("w", &[u64::MAX / 2, 4], 0, 0, 64),
        &["`w`", "overflow"],
    );
    // Huge but non-overflowing: the data cannot be in the file.
    open_err(
        &one_tensor("w", &[1 << 30, 1 << 20], 0, 0, 64),
        &["`w`", "past the end of the file"],
    );
    // Q4_0 rows must be whole blocks of 32.
    open_err(
        &one_tensor("w", &[33, 2], 2, 0, 128),
        &["`w`", "block size 32"],
    );
}

#[test]
fn tensor_data_past_eof() {
    // 4 F32 values need 16 bytes; the file has 8 after the data start.
    open_err(
        &one_tensor("token_embd.weight", &[4], 0, 0, 8),
        &["token_embd.weight", "past the end of the file"],
    );
    open_err(
        &one_tensor("w", &[4], 0, 1 << 40, 64),
        &["`w`", "past the end"],
    );
    open_err(
        &one_tensor("w", &[4], 0, u64::MAX - 2, 64),
        &["past the end"],
    );
}

#[test]
fn unknown_type_and_bad_alignment_and_duplicates() {
    let e = open_err(
        &one_tensor("w", &[4], 99, 0, 64),
        &["`w`", "unknown ggml type id 99"],
    );
    assert!(matches!(e, ModelError::Unsupported { .. }));

    let mut g = GgufBuilder::new();
    g.kv_u32("general.alignment", 3);
    open_err(&g.build(), &["general.alignment"]);

    let mut g = GgufBuilder::new();
    g.kv_u32("a", 1).kv_u32("a", 2);
    open_err(&g.build(), &["duplicate metadata key `a`"]);

    let mut g = GgufBuilder::new();
    g.tensor_f32("w", &[1], &[1.0])
        .tensor_f32("w", &[1], &[2.0]);
    open_err(&g.build(), &["duplicate tensor `w`"]);
}

#[test]
fn unsupported_quant_type_is_named_when_requested() {
    let mut g = tiny_llama();
    // Replace ffn_up (16 x 8 F32) with a one-block IQ2_XXS tensor of 256 x 1.
    for t in g.tensors.iter_mut() {
        if t.0 == "blk.0.ffn_up.weight" {
            *t = (t.0.clone(), vec![256, 1], 16, vec![0u8; 66]);
        }
    }
    let tmp = write("iq.gguf", &g.build());
    let f = GgufFile::open(&tmp.path).unwrap();
    assert!(f.has("model.layers.0.mlp.up_proj.weight"));
    let e = f.tensor("model.layers.0.mlp.up_proj.weight").unwrap_err();
    assert!(matches!(e, ModelError::Unsupported { .. }), "{e}");
    let msg = e.to_string();
    for n in ["iq.gguf", "blk.0.ffn_up.weight", "IQ2_XXS"] {
        assert!(msg.contains(n), "`{msg}` lacks `{n}`");
    }
    // Other tensors still load.
    assert!(f.tensor("model.layers.0.mlp.gate_proj.weight").is_ok());
}

#[test]
fn unsupported_architecture_and_tokenizer() {
    let mut g = tiny_llama();
    for kv in g.kvs.iter_mut() {
        if kv.0 == "general.architecture" {
            kv.2.clear();
            put_str(&mut kv.2, "gptneox");
        }
    }
    let tmp = write("neox.gguf", &g.build());
    let e = GgufFile::open(&tmp.path)
        .unwrap()
        .model_config()
        .unwrap_err();
    assert!(e.to_string().contains("architecture `gptneox`"), "{e}");
    assert!(e.to_string().contains("neox.gguf"), "{e}");

    let mut g = tiny_llama();
    for kv in g.kvs.iter_mut() {
        if kv.0 == "tokenizer.ggml.model" {
            kv.2.clear();
            put_str(&mut kv.2, "llama");
        }
    }
    let tmp = write("spm.gguf", &g.build());
    let f = GgufFile::open(&tmp.path).unwrap();
    let e = kvserve::model::gguf_tokenizer::tokenizer_json(&f).unwrap_err();
    assert!(e.to_string().contains("tokenizer model `llama`"), "{e}");
    assert!(e.to_string().contains("spm.gguf"), "{e}");
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    let full = tiny_llama().build();
    let tmp = write("whole.gguf", &full);
    assert!(GgufFile::open(&tmp.path).is_ok());
    // Every cut before the last tensor's last byte must fail.
    let f = GgufFile::open(&tmp.path).unwrap();
    let info = f.tensors().last().unwrap();
    let needed = info.file_offset + info.n_bytes;
    for cut in (0..needed).step_by(7).chain([needed - 1]) {
        let t = write("cut.gguf", &full[..cut]);
        match GgufFile::open(&t.path) {
            Ok(_) => panic!("truncation at {cut} of {} accepted", full.len()),
            Err(e) => assert!(e.to_string().contains("cut.gguf"), "{e}"),
        }
    }
}

#[test]
fn truncated_real_model() {
    let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let bytes = std::fs::read(&real)
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/fetch-model.sh", real.display()));
    let t = write("half.gguf", &bytes[..bytes.len() / 2]);
    let e = GgufFile::open(&t.path).err().unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("half.gguf") && msg.contains("past the end of the file"),
        "{msg}"
    );
}

/// Flipping bytes of a valid file never panics: the result opens or is an error, and every
/// tensor of a file that opens can be read or is an error.
#[test]
fn corrupted_bytes_never_panic() {
    let full = tiny_llama().build();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let dir = tempfile::tempdir().unwrap();
    // Corrupt only the header and tables (the data region is just numbers).
    let f = {
        let t = write("x.gguf", &full);
        let g = GgufFile::open(&t.path).unwrap();
        g.tensors()[0].file_offset
    };
    for i in 0..300 {
        let mut b = full.clone();
        for _ in 0..1 + next() % 4 {
            let pos = (next() as usize) % f;
            b[pos] = next() as u8;
        }
        let path = dir.path().join(format!("c{i}.gguf"));
        std::fs::write(&path, &b).unwrap();
        if let Ok(g) = GgufFile::open(&path) {
            let _ = g.model_config();
            let _ = kvserve::model::gguf_tokenizer::tokenizer_json(&g);
            let names: Vec<String> = g.hf_tensors().into_iter().map(|(n, _)| n).collect();
            for n in names {
                let _ = g.tensor(&n);
            }
        }
    }
}
