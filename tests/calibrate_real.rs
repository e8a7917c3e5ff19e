//! `kvserve calibrate` and the `mhc:R` policy on the real default model (SmolLM2-135M-Instruct):
//! - calibration is deterministic: the same model, text and options give the same file, byte
//!   for byte (and so the same calibration id in every block key);
//! - a projection file is checked at load: another model's, a truncated or foreign file is a
//!   clear error, and a server configured with one refuses to start;
//! - `mhc` runs through the evaluation harness (the serving path) with a measured cost: worse
//!   than the near-lossless `int8`, far from broken, and lighter than `bf16` by what its format
//!   says.
//!
//! Calibrated on a GFDL-1.3 excerpt, evaluated on an Apache-2.0 excerpt (different texts).
//! Fails (does not skip) when the model is missing: run scripts/fetch-model.sh.

mod common;

use kvserve::calibrate::{calibrate, file, Allocation, CalibrateOptions};
use kvserve::config::Config;
use kvserve::error::ModelError;
use kvserve::eval::runner::RunOptions;
use kvserve::eval::{evaluate, EvalConfig};
use kvserve::kv::policy::KvPolicySpec;
use kvserve::server::{Server, StartError};
use kvserve::tenancy::Tenancy;
use std::path::Path;

const CALIBRATION_TEXT: &str = include_str!("golden/gfdl-1.3-head.txt");
const EVAL_TEXT: &str = include_str!("golden/apache-2.0-head.txt");

fn model_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct")
}

#[test]
fn calibration_is_deterministic_and_checked_at_load() {
    let (files, model) = common::load_real_model();
    let tokens = files.tokenizer.encode(CALIBRATION_TEXT, true).unwrap();
    assert!(tokens.len() > 400, "{} tokens", tokens.len());
    let opts = CalibrateOptions {
        rank: 48,
        ctx: 256,
        max_tokens: 1024,
        allocation: Allocation::Energy,
    };
    let fingerprint = file::model_fingerprint(&model_dir()).unwrap();
    let text = ("gfdl-1.3-head.txt", "sha");
    let run = || {
        let cal = calibrate(&model, &tokens, &opts).unwrap();
        file::to_bytes(&cal, &fingerprint, "SmolLM2-135M-Instruct", text).unwrap()
    };
    let (a, b) = (run(), run());
    assert!(a == b, "two calibrations of the same text differ");

    let parsed = file::parse(&a).unwrap();
    let info = &parsed.info;
    assert_eq!(info.rank, 48);
    assert_eq!(info.ranks.len(), 30);
    assert_eq!(info.ranks.iter().sum::<usize>(), 30 * 48);
    assert!(
        info.ranks.iter().all(|&r| (12..=192).contains(&r)),
        "{:?}",
        info.ranks
    );
    assert_eq!(info.tokens, tokens.len());
    assert_eq!(info.model, fingerprint);
    // A low-rank projection of the keys keeps most of the query-weighted variance (research
    // note §4: 97.5 % at rank 48 jointly over the 3 KV heads).
    let mean_kept = info.retained.iter().sum::<f64>() / 30.0;
    assert!(
        0.9 < mean_kept && mean_kept < 1.0,
        "kept {mean_kept}: {:?}",
        info.retained
    );
    assert_eq!(parsed.keys.id, *blake3::hash(&a).as_bytes());

    // At load: the right model passes; another model, a truncated or a foreign file do not.
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("mhc48.safetensors");
    std::fs::write(&good, &a).unwrap();
    assert!(file::load(&good, &fingerprint).is_ok());
    match file::load(&good, "blake3:0000") {
        Err(ModelError::Calibration(m)) => assert!(m.contains("another model"), "{m}"),
        other => panic!("expected a model mismatch, got {other:?}"),
    }
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &a[..a.len() / 2]).unwrap();
    let foreign = dir.path().join("foreign.safetensors");
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[0u8; 4]).unwrap();
    std::fs::write(
        &foreign,
        safetensors::serialize([("x", view)], None).unwrap(),
    )
    .unwrap();
    for (bad, expect) in [
        (&truncated, "not a safetensors file"),
        (&foreign, "not a kvserve calibration"),
    ] {
        match file::load(bad, &fingerprint) {
            Err(e @ ModelError::Format { .. }) => {
                let m = e.to_string();
                assert!(m.contains(expect) && m.contains(".safetensors"), "{m}");
            }
            other => panic!("{}: expected a format error, got {other:?}", bad.display()),
        }
    }

    // A server configured with a bad projection refuses to start, saying why.
    let mut cfg = Config::default();
    cfg.model.path = model_dir();
    cfg.kv.cache_bytes = 64 << 20;
    for (bad, expect) in [(&truncated, "not a safetensors file"), (&good, "")] {
        cfg.kv.calibrations = vec![bad.clone(), good.clone()];
        let res = Server::start(&cfg, Tenancy::open(&cfg.tenants));
        let Err(e) = res else {
            panic!("started with {:?}", cfg.kv.calibrations)
        };
        let m = e.to_string();
        assert!(matches!(e, StartError::Model(_)), "{m}");
        if expect.is_empty() {
            assert!(m.contains("two projections of rank 48"), "{m}");
        } else {
            assert!(m.contains(expect), "{m}");
        }
    }
}

#[test]
fn mhc_runs_through_the_serving_path_with_a_measured_cost() {
    let (files, mut model) = common::load_real_model();
    let tokens = files.tokenizer.encode(CALIBRATION_TEXT, true).unwrap();
    let opts = CalibrateOptions {
        rank: 96,
        ctx: 256,
        max_tokens: 1024,
        allocation: Allocation::Energy,
    };
    let cal = calibrate(&model, &tokens, &opts).unwrap();
    model.attach_latent_keys(cal.keys).unwrap();

    let policies = ["int8", "mhc:96", "mhc:96+kivi4"]
        .map(|p| KvPolicySpec::parse(p).unwrap())
        .to_vec();
    let mut cfg = EvalConfig::new(EVAL_TEXT.to_string(), policies);
    cfg.ctx = vec![128];
    cfg.run = RunOptions {
        chunk: 32,
        decode_tail: 16,
    };
    cfg.max_windows = Some(2);
    let rep = evaluate(&model, &files.tokenizer, &cfg).unwrap();
    eprintln!("{}", kvserve::eval::report::markdown(&rep));
    let by = |name: &str| {
        let p = rep.policies.iter().find(|p| p.name == name);
        let p = p.unwrap_or_else(|| panic!("{name} missing"));
        (p.by_ctx[0].1, p.memory_reduction)
    };
    let (int8, int8_saved) = by("int8");
    let (mhc, mhc_saved) = by("mhc:96+int8");
    let (mhc4, mhc4_saved) = by("mhc:96+kivi4");
    // Keys through a rank-96 projection (of 192) cost more than int8 rounding, and far less
    // than a broken cache (KL of kivi2, the worst shipped format, is ~0.25 on this model).
    assert!(int8.kl < mhc.kl, "int8 {} vs mhc {}", int8.kl, mhc.kl);
    assert!(
        mhc.kl < 0.1 && mhc4.kl < 0.1,
        "mhc {} mhc+kivi4 {}",
        mhc.kl,
        mhc4.kl
    );
    assert!(mhc.top1 > 0.8, "top-1 {}", mhc.top1);
    // Sealed bytes vs bf16: latent 96 bf16 + int8 values = 0.508 (int8: 0.516); with 4-bit
    // values 0.365. Measured with the exact tail blocks, so compare with int8's measurement.
    assert!(
        mhc_saved > int8_saved && mhc4_saved > mhc_saved + 0.05,
        "saved: int8 {int8_saved}, mhc {mhc_saved}, mhc+kivi4 {mhc4_saved}"
    );
}
