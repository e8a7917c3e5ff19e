//! Prefill time saved by a prefix-cache hit on the default model: a 1,024-token shared prefix
//! plus 32 new tokens, computed cold (miss) and after another request with the same prefix
//! (hit), alternating for several rounds. Also prints the pool's KV bytes per token.
//!
//! Usage: `cargo run --release --bin bench_prefix [MODEL] [ROUNDS]`

use anyhow::{Context, Result};
use kvserve::backend::cpu::CpuBackend;
use kvserve::config::{KvSection, TenantConfig};
use kvserve::engine::generate::{generate_paged, GenerateOptions};
use kvserve::engine::paged::PagedKv;
use kvserve::model::llama::Llama;
use kvserve::model::loader;
use kvserve::types::{SamplingParams, TenantId};

const PREFIX: usize = 1024;
const SUFFIX: usize = 32;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct".into());
    let rounds: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(3);
    let files = loader::open(path.as_ref()).with_context(|| format!("opening {path}"))?;
    let model = Llama::from_files(&files, CpuBackend::new())?;
    let text = std::fs::read_to_string("README.md")?;
    let ids = files.tokenizer.encode(&text, true)?;
    let prefix: Vec<u32> = ids.iter().copied().cycle().take(PREFIX).collect();
    let with_suffix = |salt: u32| -> Vec<u32> {
        let mut p = prefix.clone();
        p.extend((0..SUFFIX as u32).map(|i| 1000 + (i * 7 + salt * 13) % 20000));
        p
    };
    let kv_cfg = KvSection::default();
    let tenants = [TenantConfig::default()];
    let opts = GenerateOptions {
        kv_policy: kvserve::kv::policy::KvPolicy::EXACT,
        max_tokens: 1,
        stop_ids: vec![],
        ignore_eos: true,
        sampling: SamplingParams::default(),
    };
    let bytes_per_block = model.kv_bytes_per_block(kv_cfg.block_size);
    println!(
        "KV pool: {} bytes per block of {} tokens = {} bytes per token",
        bytes_per_block,
        kv_cfg.block_size,
        bytes_per_block / kv_cfg.block_size
    );
    let (mut miss_total, mut hit_total) = (0.0, 0.0);
    for round in 0..rounds as u32 {
        // Miss: a fresh pool.
        let mut kv = PagedKv::with_blocks(&model, &kv_cfg, &tenants, 512)?;
        let scope = kv.pool.scope(TenantId(0), None);
        let miss = generate_paged(
            &model,
            &mut kv,
            TenantId(0),
            &scope,
            &with_suffix(round * 2),
            &opts,
            |_| {},
        )?;
        // Hit: the prefix is now cached; a new suffix follows it.
        let hit = generate_paged(
            &model,
            &mut kv,
            TenantId(0),
            &scope,
            &with_suffix(round * 2 + 1),
            &opts,
            |_| {},
        )?;
        let (m, h) = (
            miss.prefill_time.as_secs_f64(),
            hit.prefill_time.as_secs_f64(),
        );
        miss_total += m;
        hit_total += h;
        println!(
            "round {round}: miss {:.1} ms ({} cached), hit {:.1} ms ({} cached), ratio {:.1}x",
            m * 1e3,
            miss.cached_tokens,
            h * 1e3,
            hit.cached_tokens,
            m / h
        );
    }
    println!(
        "mean over {rounds} rounds: miss {:.1} ms, hit {:.1} ms, hit/miss = {:.3}",
        miss_total / rounds as f64 * 1e3,
        hit_total / rounds as f64 * 1e3,
        hit_total / miss_total
    );
    Ok(())
}
