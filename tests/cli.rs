//! The `kvserve generate` command line on a tiny model: JSON lines, text streaming, chat
//! templating, and clear errors.

mod common;

use common::{write_tiny_model, TinySpec};
use std::process::Command;

fn kvserve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvserve"))
}

#[test]
fn generate_json_prints_one_object_per_token_with_logprobs() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 11);
    let out = kvserve()
        .args(["generate", "--model"])
        .arg(dir.path())
        .args([
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "6",
            "--json",
            "--logprobs",
            "3",
            "--ignore-eos",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for l in &lines {
        let top = l["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one and carries its logprob.
        assert_eq!(top[0][0], l["id"]);
        assert_eq!(
            top[0][1].as_f64().unwrap() as f32,
            l["logprob"].as_f64().unwrap() as f32
        );
        assert!(l["logprob"].as_f64().unwrap() <= 0.0);
        assert!(l["text"].is_string());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("prefill: 3 tokens") && stderr.contains("tok/s"),
        "{stderr}"
    );
}

#[test]
fn generate_text_and_chat_modes_agree_with_json_ids() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 12);
    let run = |extra: &[&str]| {
        let out = kvserve()
            .args(["generate", "--model"])
            .arg(dir.path())
            .args([
                "--max-tokens",
                "8",
                "--ignore-eos",
                "--temperature",
                "0.8",
                "--seed",
                "5",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // Same seed, same tokens: the streamed text equals the concatenated JSON texts.
    let json = run(&["--prompt", "hello", "--json"]);
    let joined: String = json
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let text = run(&["--prompt", "hello"]);
    assert_eq!(text.trim_end_matches('\n'), joined.replace("<|eos|>", ""));
    // Chat mode renders the template before tokenizing: a different prompt, so different logits.
    let chat = run(&["--prompt", "hello", "--chat", "--json"]);
    assert_eq!(chat.lines().count(), 8);
}

#[test]
fn generate_reports_bad_model_path_and_missing_prompt() {
    let out = kvserve()
        .args(["generate", "--model", "/nonexistent/dir", "--prompt", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/dir") && err.contains("not found"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 13);
    let out = kvserve()
        .args(["generate", "--model"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--prompt"));
}

#[test]
fn generate_with_a_kv_budget_reports_the_pool_and_rejects_a_budget_below_one_block() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default(), 14);
    let run = |bytes: &str| {
        kvserve()
            .args(["generate", "--model"])
            .arg(dir.path())
            .args([
                "--prompt-ids",
                "1,2,3",
                "--max-tokens",
                "4",
                "--ignore-eos",
                "--kv-cache-bytes",
                bytes,
            ])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    // Tiny model: 2 layers × 2 (K, V) × 2 KV heads × 8 dims × 4 bytes × 16 tokens = 4096 per block.
    let ok = run("40960");
    let err = String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "{err}");
    assert!(err.contains("KV pool: 10 blocks of 16 tokens"), "{err}");
    let bad = run("100");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("holds no block"));
}

#[test]
fn hash_key_prints_the_digest_a_tenants_file_stores() {
    let out = kvserve().args(["hash-key", "abc"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let out = kvserve()
        .arg("hash-key")
        .env("KVSERVE_API_KEY", "sk-acme-example")
        .output()
        .unwrap();
    let digest = String::from_utf8(out.stdout).unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/tenants.example.toml"
    ))
    .unwrap();
    assert!(example.contains(digest.trim()));
}
