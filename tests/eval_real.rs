//! The quality-evaluation harness end to end on the real default model (SmolLM2-135M-Instruct):
//! windows of a short text and passkey prompts run through the paged path for `bf16` and
//! `int8`, and the report's JSON and markdown have the documented shape. Also one CLI smoke
//! run of `kvserve eval` on a tiny random model (JSON, markdown and PNG files written).
//!
//! Fails (does not skip) when the model is missing: run scripts/fetch-model.sh.

mod common;

use kvserve::eval::runner::RunOptions;
use kvserve::eval::{evaluate, report, EvalConfig};
use kvserve::kv::policy::KvPolicySpec;
use std::time::Instant;

const TEXT: &str = include_str!("golden/apache-2.0-head.txt");

#[test]
fn eval_on_the_real_model_reports_sane_numbers_for_bf16_and_int8() {
    let (files, model) = common::load_real_model();
    let mut cfg = EvalConfig::new(TEXT.to_string(), vec![KvPolicySpec::parse("int8").unwrap()]);
    cfg.text_path = "tests/golden/apache-2.0-head.txt".into();
    cfg.model_id = "SmolLM2-135M-Instruct".into();
    cfg.command = "eval_real".into();
    cfg.ctx = vec![128];
    cfg.run = RunOptions {
        chunk: 32,
        decode_tail: 16,
    };
    cfg.max_windows = Some(2);
    cfg.passkey = vec![256];
    let t0 = Instant::now();
    let rep = evaluate(&model, &files.tokenizer, &cfg).unwrap();
    eprintln!("eval took {:.1} s", t0.elapsed().as_secs_f64());

    let md = report::markdown(&rep);
    eprintln!("{md}");
    let json: serde_json::Value = serde_json::from_str(&rep.to_json()).unwrap();
    assert!(json["text"]["tokens"].as_u64().unwrap() >= 256);
    assert_eq!(json["text"]["sha256"].as_str().unwrap().len(), 64);
    assert!(json["date"].as_str().unwrap().ends_with('Z'));
    let pols = json["policies"].as_array().unwrap();
    assert_eq!(pols.len(), 2);
    assert_eq!(pols[0]["name"], "bf16");
    assert_eq!(pols[1]["name"], "int8");
    for p in pols {
        assert!(p["bytes_per_token"].as_f64().unwrap() > 0.0);
        assert!(p["passkey"]["256"].as_str().unwrap().ends_with("/3"));
        assert_eq!(p["passkey_hits"]["256"].as_array().unwrap().len(), 3);
        let c = &p["by_ctx"]["128"];
        // Two windows of 128 tokens: 127 predicted positions each.
        assert_eq!(c["tokens"], 254);
        for k in ["ppl", "dppl_pct", "kl", "top1"] {
            assert!(c[k].as_f64().unwrap().is_finite(), "{k}: {c}");
        }
    }
    let table: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(table.len(), 4, "{md}");
    assert!(table[0].contains("Δppl @128") && table[0].contains("passkey"));
    assert!(table[2].starts_with("| bf16 |") && table[3].starts_with("| int8 |"));

    let reference = &rep.policies[0];
    let r = reference.by_ctx[0].1;
    assert_eq!(r.kl, 0.0, "the reference against itself");
    assert_eq!(r.top1, 1.0);
    assert_eq!(r.dppl_pct, 0.0);
    assert_eq!(reference.memory_reduction, 0.0);
    assert!(1.5 < r.ppl && r.ppl < 200.0, "ppl {}", r.ppl);
    // A 256-token passkey is easy for the model at full precision.
    assert_eq!(reference.passkey[0].1, vec![true; 3], "{md}");

    // int8 must stay ≈ lossless (research note §4: KL 4–6e-4 on this model).
    let int8 = rep.policies[1].by_ctx[0].1;
    assert!(int8.dppl_pct.abs() <= 0.5, "int8 Δppl {} %", int8.dppl_pct);
    assert!(int8.kl < 5e-3, "int8 KL {}", int8.kl);
    // The format's steady state: int8 codes + an f16 scale per token and head = 0.516 of bf16.
    let sealed = rep.policies[1].sealed_reduction;
    assert!((sealed - 0.484).abs() < 1e-3, "int8 sealed saving {sealed}");
}

#[test]
fn cli_eval_writes_json_markdown_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    common::write_tiny_model(&model, common::TinySpec::default(), 3);
    let text = dir.path().join("text.txt");
    std::fs::write(&text, TEXT).unwrap();
    let (json, md, png) = (
        dir.path().join("r.json"),
        dir.path().join("r.md"),
        dir.path().join("r.png"),
    );
    // The chart needs the DejaVu font (`fonts-dejavu-core`, installed by .ci/run).
    assert!(
        std::path::Path::new(report::FONT_PATH).exists(),
        "{} is missing: apt-get install fonts-dejavu-core",
        report::FONT_PATH
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kvserve"));
    cmd.args(["eval", "--device", "cpu", "--model"])
        .arg(&model)
        .arg("--text")
        .arg(&text)
        .args(["--policy", "int8", "--ctx", "32,64", "--chunk", "8"])
        .args([
            "--decode-tail",
            "4",
            "--max-windows",
            "1",
            "--passkey",
            "250",
        ])
        .arg("--out-json")
        .arg(&json)
        .arg("--out-md")
        .arg(&md);
    cmd.arg("--out-png").arg(&png);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout, std::fs::read_to_string(&md).unwrap());
    assert!(stdout.contains("| int8 |"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["policies"][0]["name"], "bf16");
    assert!(v["command"].as_str().unwrap().contains("--ctx 32,64"));
    assert!(v["policies"][1]["by_ctx"]["64"]["kl"].is_number());
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
}
