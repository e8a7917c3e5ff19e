//! Tests of the default-model checks, with the CPU backend on both sides.
use super::*;
use crate::streams::{agreement, generate, Limits};
use crate::verdict::Picks;
use crate::TOL;

/// A small model with a query group of 3, as the default's. Untied: with tied random
/// embeddings every model's top token is the one it was fed (its own embedding dominates the
/// last hidden state), so picks from other weights would agree and prove nothing.
fn tiny(seed: u64) -> (ModelConfig, RandomWeights) {
    let cfg = llama_config(300, 96, 160, 3, 6, 2, 16);
    let w = RandomWeights::new(&cfg, seed);
    (cfg, w)
}

fn pair(cpu_seed: u64, dev_seed: u64) -> Pair<CpuBackend> {
    let (cfg, w) = tiny(cpu_seed);
    let (_, w2) = tiny(dev_seed);
    let mut p = Pair {
        cpu: Llama::load(cfg.clone(), &w, CpuBackend::with_bf16_kv()).unwrap(),
        dev: Llama::load(cfg.clone(), &w2, CpuBackend::with_bf16_kv()).unwrap(),
        prompts: random_prompts(&cfg, 3),
        weights: "test".into(),
    };
    for (i, &rank) in MHC_RANKS.iter().enumerate() {
        if rank as usize <= 32 {
            let keys = random_latent(&cfg, rank, 900 + i as u64);
            p.cpu.attach_latent_keys(keys.clone()).unwrap();
            p.dev.attach_latent_keys(keys).unwrap();
        }
    }
    p
}

#[test]
fn the_cpu_against_itself_passes_every_served_policy() {
    let p = pair(1, 1);
    let mut checked = 0;
    for (name, policy) in policies() {
        if !p.dev.serves_policy(&policy) {
            continue;
        }
        let r = forward_parity(&p, policy, 7).unwrap();
        assert_eq!(r.logits, 0.0, "{name}");
        // Every sequence asks for each kind of pick at least twice.
        assert!(r.greedy.n >= 8 && r.drawn.n >= 8, "{name}: {r:?}");
        assert_eq!(r.greedy.same, r.greedy.n, "{name}");
        assert_eq!(r.drawn.same, r.drawn.n, "{name}");
        assert!(
            r.greedy.worst == 0.0 && r.drawn.worst < 1e-9,
            "{name}: {r:?}"
        );
        assert!(r.worst() <= TOL);
        assert_eq!(r.verdict(), Verdict::Strict, "{name}");
        // Both sides pay the policy's cost against exact KV alike (nothing for exact itself).
        assert_eq!(r.kl_cpu, r.kl_dev, "{name}");
        assert!(r.kl_rows >= 4 * 16, "{name}: {r:?}");
        if policy == KvPolicy::EXACT {
            assert_eq!(r.kl_cpu, 0.0);
        }
        checked += 1;
    }
    // Exact, the five plain formats, two windows, two quests, mhc:32.
    assert_eq!(checked, 11);
}

#[test]
fn other_weights_on_the_device_fail_it() {
    let p = pair(1, 2);
    let r = forward_parity(&p, KvPolicy::format(Codec::Int8), 7).unwrap();
    assert!(r.logits > TOL, "{r:?}");
    assert!(r.worst() > TOL);
    // Tokens picked from other logits land far from the CPU's.
    assert!(r.greedy.worst > TOL && r.drawn.worst > TOL, "{r:?}");
    // And the other model is much further from the CPU's exact logits than int8 is.
    let (cpu, dev) = r.kl();
    assert!(dev > 10.0 * cpu, "{r:?}");
    assert_eq!(r.verdict(), Verdict::Fail);
}

#[test]
fn verdicts_follow_their_rules() {
    let picks = |worst| Picks {
        n: 4,
        same: 4,
        worst,
    };
    let r = |logits: f64, greedy: f64, kl_cpu: f64, kl_dev: f64| PolicyParity {
        logits,
        greedy: picks(greedy),
        drawn: picks(0.0),
        kl_cpu: 10.0 * kl_cpu,
        kl_dev: 10.0 * kl_dev,
        kl_rows: 10,
    };
    assert_eq!(r(5e-3, 0.0, 0.1, 0.5).verdict(), Verdict::Strict);
    assert_eq!(r(5e-2, 0.0, 0.1, 0.14).verdict(), Verdict::Quality);
    assert_eq!(r(5e-2, 0.0, 0.1, 0.16).verdict(), Verdict::Fail);
    assert_eq!(r(5e-2, 2e-2, 0.1, 0.1).verdict(), Verdict::Fail);
    assert_eq!(r(5e-2, 0.0, 0.0, 5e-5).verdict(), Verdict::Quality);
}

#[test]
fn kl_of_logits_rows() {
    let p = [0.0f32, 1.0, 2.0];
    assert_eq!(kl_logits(&p, &p), 0.0);
    // A shift of every logit is the same distribution.
    let shifted: Vec<f32> = p.iter().map(|x| x + 3.0).collect();
    assert!(kl_logits(&p, &shifted) < 1e-12);
    // Against the uniform distribution: log 3 - H(p).
    let u = [0.0f32; 3];
    let w: Vec<f64> = p.iter().map(|&x| (x as f64).exp()).collect();
    let z: f64 = w.iter().sum();
    let h: f64 = -w.iter().map(|x| x / z * (x / z).ln()).sum::<f64>();
    assert!((kl_logits(&p, &u) - (3f64.ln() - h)).abs() < 1e-12);
    // A token p gives no mass to carries none into the sum.
    let masked = [f32::NEG_INFINITY, 1.0, 2.0];
    assert!(kl_logits(&masked, &p) > 0.0 && kl_logits(&masked, &p).is_finite());
}

#[test]
fn gaps_measure_distance_from_the_cpus_choice() {
    let row = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY, 2.9];
    assert_eq!(greedy_gap(&row, 1), 0.0);
    assert!((greedy_gap(&row, 4) - 0.1 / 3.0).abs() < 1e-6);
    assert_eq!(greedy_gap(&row, 3), f64::INFINITY);
    assert_eq!(greedy_gap(&row, 9), f64::INFINITY);
    // The CPU's draw lies inside its own token's share, for any uniform.
    let mut scratch = Vec::new();
    for i in 0..200 {
        let u = i as f64 / 200.0;
        let t = draw_dense_row(&row, 0.7, u, &mut scratch);
        assert!(draw_gap(&row, 0.7, u, t) < 1e-7, "u {u} token {t}");
    }
    // u = 0 draws token 0; token 2 starts after the shares of tokens 0 and 1.
    let w: Vec<f64> = row
        .iter()
        .map(|&x| ((x as f64 - 3.0) * 0.7f32 as f64).exp())
        .collect();
    let total: f64 = w.iter().filter(|x| x.is_finite()).sum();
    assert!((draw_gap(&row, 0.7, 0.0, 2) - (w[0] + w[1]) / total).abs() < 1e-12);
    assert_eq!(draw_gap(&row, 0.7, 0.0, 0), 0.0);
}

/// The real model's path of the section (GGUF, tokenizer, prompts cut from the text), run
/// with the CPU on both sides; `scripts/fetch-model.sh` puts the file there.
#[test]
fn the_default_models_gguf_loads_and_runs_on_both_sides() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(GGUF);
    assert!(
        path.exists(),
        "{}: run scripts/fetch-model.sh",
        path.display()
    );
    let p = Pair::load(CpuBackend::with_bf16_kv(), Some(&path)).unwrap();
    assert!(p.weights.starts_with("real weights"), "{}", p.weights);
    assert_eq!(p.cpu.config().vocab_size, 49_152);
    assert!(p.cpu.config().tie_word_embeddings);
    let lens: Vec<usize> = p.prompts.iter().map(Vec::len).collect();
    assert_eq!(lens, PROMPT_LENS);
    assert_ne!(p.prompts[0][..16], p.prompts[3][..]);
    // Every published rank fits its 192 KV channels.
    assert_eq!(p.dev.latent_keys().len(), MHC_RANKS.len());
    let policy = KvPolicy {
        quest: Some(64),
        ..KvPolicy::format(Codec::Mhc {
            rank: 64,
            values: MhcValues::Kivi4,
        })
    };
    let r = forward_parity(&p, policy, 3).unwrap();
    assert_eq!(r.logits, 0.0);
    assert_eq!((r.greedy.same, r.drawn.same), (r.greedy.n, r.drawn.n));
}

#[test]
fn engine_streams_compare() {
    let p = pair(1, 1);
    let prompts: Vec<Vec<u32>> = p
        .prompts
        .iter()
        .map(|x| x[..20.min(x.len())].to_vec())
        .collect();
    let (cpu, dev) = (Arc::new(p.cpu), Arc::new(p.dev));
    let kivi4 = KvPolicy::format(Codec::Kivi4);
    let roomy = Limits::roomy(&prompts, 6);
    let a = generate(cpu.clone(), &prompts, 6, kivi4, roomy).unwrap();
    let b = generate(dev, &prompts, 6, kivi4, roomy).unwrap();
    // A pool with room for one sequence at a time gives the same tokens.
    let tight = Limits::tight(&prompts, 6);
    assert!(tight.blocks < roomy.blocks / 2, "{tight:?} {roomy:?}");
    assert_eq!(generate(cpu, &prompts, 6, kivi4, tight).unwrap(), a);
    assert!(a.iter().all(|s| s.len() == 6));
    assert_eq!(agreement(&a, &b), (4, 6.0));
    let mut c = b.clone();
    c[1][3] += 1;
    assert_eq!(agreement(&a, &c), (3, 5.25));
}
