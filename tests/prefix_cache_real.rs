//! The paged pool's prefix cache on the real model: a repeated prompt from one tenant computes
//! only its uncached tail and produces identical greedy tokens; the same prompt from another
//! tenant, or under another cache salt, hits nothing; a share group does hit; every block is
//! free again at the end.

mod common;

use kvserve::backend::cpu::CpuBackend;
use kvserve::config::{KvSection, TenantConfig};
use kvserve::engine::generate::{generate_paged, GenerateOptions};
use kvserve::engine::paged::PagedKv;
use kvserve::model::llama::Llama;
use kvserve::types::{SamplingParams, TokenId};

fn model() -> (Llama<CpuBackend>, Vec<TokenId>) {
    let (files, model) = common::load_real_model();
    let text = "The KV cache stores the keys and values of every token a model has seen, so that \
                each new token attends to the past without recomputing it. "
        .repeat(8);
    let prompt = files.tokenizer.encode(&text, true).unwrap();
    (model, prompt)
}

fn tenant(name: &str, group: Option<&str>) -> TenantConfig {
    TenantConfig {
        name: name.into(),
        share_group: group.map(str::to_string),
        ..TenantConfig::default()
    }
}

#[test]
fn prefix_hits_stay_within_a_tenant_and_give_identical_tokens() {
    let (model, prompt) = model();
    assert!(prompt.len() > 150, "prompt has {} tokens", prompt.len());
    let tenants = [
        tenant("a", None),
        tenant("b", None),
        tenant("g1", Some("g")),
        tenant("g2", Some("g")),
    ];
    let mut kv = PagedKv::with_blocks(&model, &KvSection::default(), &tenants, 256).unwrap();
    let opts = GenerateOptions {
        kv_policy: kvserve::kv::policy::KvPolicy::EXACT,
        max_tokens: 12,
        stop_ids: vec![],
        ignore_eos: true,
        sampling: SamplingParams {
            top_logprobs: 3,
            ..Default::default()
        },
    };
    let ids = |o: &kvserve::engine::generate::GenerateOutput| {
        o.tokens.iter().map(|s| s.token).collect::<Vec<_>>()
    };
    let run = |kv: &mut PagedKv<CpuBackend>, name: &str, salt: Option<&str>| {
        let t = kv.tenant(name).unwrap();
        let scope = kv.pool.scope(t, salt);
        generate_paged(&model, kv, t, &scope, &prompt, &opts, |_| {}).unwrap()
    };
    let bs = 16;
    let full_hit = (prompt.len() - 1) / bs * bs;

    let cold = run(&mut kv, "a", None);
    assert_eq!(cold.cached_tokens, 0);
    let warm = run(&mut kv, "a", None);
    assert_eq!(warm.cached_tokens, full_hit);
    assert_eq!(ids(&warm), ids(&cold));
    for (w, c) in warm.tokens.iter().zip(&cold.tokens) {
        for (x, y) in w.top_logprobs.iter().zip(&c.top_logprobs) {
            assert_eq!(x.0, y.0);
            assert!((x.1 - y.1).abs() < 1e-4, "{x:?} vs {y:?}");
        }
    }

    // Another tenant, or the same tenant under a cache salt: nothing cached, same tokens.
    let other = run(&mut kv, "b", None);
    assert_eq!(other.cached_tokens, 0);
    assert_eq!(ids(&other), ids(&cold));
    assert_eq!(run(&mut kv, "a", Some("salt")).cached_tokens, 0);

    // Operator-declared share group: g2 hits what g1 computed.
    assert_eq!(run(&mut kv, "g1", None).cached_tokens, 0);
    let shared = run(&mut kv, "g2", None);
    assert_eq!(shared.cached_tokens, full_hit);
    assert_eq!(ids(&shared), ids(&cold));

    let stats = kv.pool.stats();
    assert_eq!(stats.used, 0, "blocks leaked: {stats:?}");
    kv.pool.check_invariants().unwrap();
    let a = kv.tenant("a").unwrap();
    let a_stats = &stats.tenants.iter().find(|(t, _)| *t == a).unwrap().1;
    assert_eq!(a_stats.prefix_hit_tokens, full_hit as u64);
}
