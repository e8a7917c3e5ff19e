//! The `kvserve` command line: parse, set up logging, call the library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kvserve::backend::cpu::CpuBackend;
use kvserve::backend::cuda::{CudaBackend, DeviceArg};
use kvserve::backend::Backend;
use kvserve::config::{Config, KvSection, TenantConfig};
use kvserve::engine::generate::{generate, generate_paged, GenerateOptions};
use kvserve::engine::paged::PagedKv;
use kvserve::eval::runner::RunOptions;
use kvserve::eval::{report, EvalConfig};
use kvserve::kv::policy::KvPolicySpec;
use kvserve::model::chat_template::ChatMessage;
use kvserve::model::llama::Llama;
use kvserve::model::loader::WeightFormat;
use kvserve::model::tokenizer::IncrementalDecoder;
use kvserve::model::{convert, loader};
use kvserve::tenancy::Tenancy;
use kvserve::types::{SamplingParams, TenantId};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The default model, as `scripts/fetch-model.sh` lays it out.
const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct";

#[derive(Parser)]
#[command(
    name = "kvserve",
    version,
    about = "OpenAI-compatible multi-tenant LLM inference server"
)]
struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. `info` or `kvserve=debug`.
    #[arg(long, global = true, env = "RUST_LOG", default_value = "warn")]
    log: String,
    /// Log line format: `text` (human-readable) or `json` (one object per line, with the
    /// request span's `id` and `tenant`).
    #[arg(
        long,
        global = true,
        env = "KVSERVE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: kvserve::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Generate text from a prompt (on the GPU when one is usable), streaming it to stdout.
    Generate(GenerateArgs),
    /// Measure KV policies against bf16: perplexity, KL, top-1 agreement, KV bytes, passkey.
    Eval(EvalArgs),
    /// Compute the key projection of the experimental `mhc:R` KV policy from a text.
    Calibrate(CalibrateArgs),
    /// Print the token ids of a text, comma-separated (input for `generate --prompt-ids`).
    Tokenize {
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long, conflicts_with = "file")]
        text: Option<String>,
        /// Read the text from a file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Repeat the ids (cyclically) until exactly this many, for fixed-length benchmarks.
        #[arg(long)]
        repeat_to: Option<usize>,
    },
    /// Convert a GGUF file to a Hugging Face directory (bf16 safetensors + config + tokenizer).
    Convert {
        #[arg(long)]
        gguf: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the SHA-256 digest of an API key, as a tenants file stores it (`api_keys_sha256`).
    HashKey {
        /// The key; read from the KVSERVE_API_KEY environment variable if not given (keeps it
        /// out of the shell history).
        #[arg(env = "KVSERVE_API_KEY")]
        key: String,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// A Hugging Face model directory or a `.gguf` file (default: the config's `model.path`).
    #[arg(long, env = "KVSERVE_MODEL")]
    model: Option<PathBuf>,
    /// Address to listen on (default: the config's `server.host`, 127.0.0.1).
    #[arg(long, env = "KVSERVE_HOST")]
    host: Option<String>,
    /// Port (0 picks a free one; default: the config's `server.port`, 8000).
    #[arg(long, env = "KVSERVE_PORT")]
    port: Option<u16>,
    /// A kvserve TOML config file (see config/default.toml).
    #[arg(long, env = "KVSERVE_CONFIG")]
    config: Option<PathBuf>,
    /// A tenants file (see config/tenants.example.toml): API keys, quotas and limits. Without
    /// one the server has a single tenant and no authentication.
    #[arg(long, env = "KVSERVE_TENANTS")]
    tenants: Option<PathBuf>,
    /// Serve without API keys on a non-loopback address (trusted networks only).
    #[arg(long, env = "KVSERVE_ALLOW_OPEN")]
    allow_open: bool,
    /// KV pool budget in bytes (overrides `kv.cache_bytes`).
    #[arg(long, env = "KVSERVE_KV_CACHE_BYTES")]
    kv_cache_bytes: Option<u64>,
    /// On a GPU with `kv.cache_bytes` 0: the share of the device's memory kvserve may use,
    /// the KV pool taking what the weights and a step's working memory leave (overrides
    /// `kv.gpu_memory_utilization`, default 0.9).
    #[arg(long, env = "KVSERVE_GPU_MEMORY_UTILIZATION")]
    gpu_memory_utilization: Option<f64>,
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, env = "KVSERVE_THREADS")]
    threads: Option<usize>,
    /// Compute device: `auto` (the GPU when one is usable, else the CPU), `cpu`, `cuda`, `cuda:N`.
    #[arg(long, env = "KVSERVE_DEVICE", default_value = "auto")]
    device: DeviceArg,
    /// A `.gguf` file's quantized matrices: `native` (as stored) or `bf16` (overrides
    /// `model.weights`).
    #[arg(long, env = "KVSERVE_WEIGHTS")]
    weights: Option<WeightFormat>,
    /// A `kvserve calibrate` projection file serving `mhc:R` (repeatable; adds to the config's
    /// `kv.calibrations`).
    #[arg(
        long = "kv-calibration",
        env = "KVSERVE_KV_CALIBRATION",
        value_delimiter = ','
    )]
    kv_calibrations: Vec<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    /// A Hugging Face model directory or a `.gguf` file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. `1,2,3`.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Optional system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Logit bias as `ID:BIAS`, repeatable.
    #[arg(long, value_parser = parse_bias)]
    logit_bias: Vec<(u32, f32)>,
    /// Report the top-K alternatives of each token (with --json).
    #[arg(long, default_value_t = 0)]
    logprobs: usize,
    /// Print one JSON object per generated token instead of text.
    #[arg(long)]
    json: bool,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Compute device: `auto` (the GPU when one is usable, else the CPU), `cpu`, `cuda`, `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: DeviceArg,
    /// A `.gguf` file's quantized matrices: `native` (as stored, the CPU multiplies with them)
    /// or `bf16` (dequantized and rounded, as `kvserve convert` writes them).
    #[arg(long, default_value = "native")]
    weights: WeightFormat,
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// KV pool budget in bytes (the pool a server would have; 0 = sized to the machine).
    /// Without it the pool is just big enough for this request.
    #[arg(long)]
    kv_cache_bytes: Option<u64>,
    /// KV policy (`bf16`, `int8`, `kivi4`, `kivi4+window:1024`, …; `exact` = f32, the default).
    #[arg(long, default_value = "exact")]
    kv_policy: String,
    /// A `kvserve calibrate` projection file serving `mhc:R` (repeatable).
    #[arg(long = "kv-calibration")]
    kv_calibrations: Vec<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    /// A Hugging Face model directory or a `.gguf` file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// The evaluation text (plain text; tokenized as `generate` tokenizes a prompt).
    #[arg(long)]
    text: PathBuf,
    /// A KV policy to compare with `bf16` (repeatable; `bf16`, the reference, always runs first).
    #[arg(long = "policy", value_parser = parse_policy)]
    policies: Vec<KvPolicySpec>,
    /// Window lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048")]
    ctx: Vec<usize>,
    /// Prefill chunk in tokens.
    #[arg(long, default_value_t = 64)]
    chunk: usize,
    /// Trailing tokens of each window fed one per step, as decode.
    #[arg(long, default_value_t = 64)]
    decode_tail: usize,
    /// At most this many windows per context length (default: all that fit in the text).
    #[arg(long)]
    max_windows: Option<usize>,
    /// Passkey prompt lengths in tokens, comma-separated (depths 10/50/90 % each).
    #[arg(long, value_delimiter = ',')]
    passkey: Vec<usize>,
    /// Seed of the passkey numbers.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Write the full results as JSON.
    #[arg(long)]
    out_json: Option<PathBuf>,
    /// Write the markdown table (it is always printed).
    #[arg(long)]
    out_md: Option<PathBuf>,
    /// Write a PNG chart: memory saved vs Δppl at the largest context.
    #[arg(long)]
    out_png: Option<PathBuf>,
    /// Compute device: `auto` (the GPU when one is usable, else the CPU), `cpu`, `cuda`, `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: DeviceArg,
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// A `kvserve calibrate` projection file serving `mhc:R` (repeatable).
    #[arg(long = "kv-calibration")]
    kv_calibrations: Vec<PathBuf>,
}

#[derive(Args)]
struct CalibrateArgs {
    /// A Hugging Face model directory or a `.gguf` file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// The calibration text (use another text than the one you evaluate on).
    #[arg(long)]
    text: PathBuf,
    /// The R of `mhc:R`: latent components per token and layer, on average over layers.
    #[arg(long)]
    rank: u16,
    /// How ranks are spread over layers: `energy` (water-filling on the logit error, at least
    /// R/4 per layer) or `uniform` (R everywhere).
    #[arg(long, default_value = "energy")]
    ranks: kvserve::calibrate::Allocation,
    /// Window length in tokens.
    #[arg(long, default_value_t = 1024)]
    ctx: usize,
    /// Use at most this many tokens of the text.
    #[arg(long, default_value_t = 16384)]
    max_tokens: usize,
    /// Where to write the projection (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

fn parse_policy(s: &str) -> Result<KvPolicySpec, String> {
    KvPolicySpec::parse(s)
}

fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, b) = s.split_once(':').ok_or("expected ID:BIAS")?;
    Ok((
        id.trim()
            .parse()
            .map_err(|e| format!("bad token id: {e}"))?,
        b.trim().parse().map_err(|e| format!("bad bias: {e}"))?,
    ))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let logs = kvserve::logging::subscriber(&cli.log, cli.log_format, std::io::stderr)
        .map_err(anyhow::Error::msg)?;
    // Also routes the `log` crate's records (dependencies) into the subscriber.
    tracing_subscriber::util::SubscriberInitExt::try_init(logs)
        .context("installing the log subscriber")?;
    match cli.command {
        Command::Serve(args) => run_serve(args),
        Command::Generate(args) => run_generate(args),
        Command::Eval(args) => run_eval(args),
        Command::Calibrate(args) => run_calibrate(args),
        Command::Tokenize {
            model,
            text,
            file,
            repeat_to,
        } => {
            let text = match (text, file) {
                (Some(t), _) => t,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?,
                (None, None) => bail!("give --text TEXT or --file FILE"),
            };
            let files = loader::open(&model)?;
            let mut ids = files.tokenizer.encode(&text, true)?;
            if let Some(n) = repeat_to {
                if ids.is_empty() {
                    bail!("the text has no tokens");
                }
                ids = ids.iter().copied().cycle().take(n).collect();
            }
            let line: Vec<String> = ids.iter().map(u32::to_string).collect();
            println!("{}", line.join(","));
            Ok(())
        }
        Command::HashKey { key } => {
            println!("{}", kvserve::tenancy::hash_key(&key));
            Ok(())
        }
        Command::Convert { gguf, out } => {
            convert::convert_gguf(&gguf, &out, &mut |msg| eprintln!("{msg}"))
                .with_context(|| format!("converting {}", gguf.display()))?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
    }
}

/// The backend a command runs on, as `--device` chose it.
enum Chosen {
    Cpu(CpuBackend),
    Cuda(Box<CudaBackend>),
}

/// Picks the backend `device` asks for and says which on stderr with its reason (`label` starts
/// the line); `cuda` without a usable GPU is an error.
fn choose_backend(device: DeviceArg, label: &str) -> Result<Chosen> {
    use kvserve::backend::cuda::{choose, Choice};
    Ok(match choose(device).map_err(anyhow::Error::msg)? {
        Choice::Cpu { reason } => {
            eprintln!("{label} cpu ({reason})");
            Chosen::Cpu(CpuBackend::new())
        }
        Choice::Cuda(gpu) => {
            eprintln!(
                "{label} cuda:{} ({}, sm_{}): a usable GPU was found",
                gpu.ordinal, gpu.name, gpu.arch
            );
            Chosen::Cuda(Box::new(CudaBackend::new(gpu)?))
        }
    })
}

/// `--threads N`: the CPU backend's worker threads (default: all cores).
fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }
    Ok(())
}

fn run_serve(args: ServeArgs) -> Result<()> {
    set_threads(args.threads)?;
    let mut cfg = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(m) = args.model {
        cfg.model.path = m;
    }
    if let Some(w) = args.weights {
        cfg.model.weights = w;
    }
    if let Some(h) = args.host {
        cfg.server.host = h;
    }
    if let Some(p) = args.port {
        cfg.server.port = p;
    }
    if args.allow_open {
        cfg.server.allow_open = true;
    }
    if let Some(b) = args.kv_cache_bytes {
        cfg.kv.cache_bytes = b;
    }
    if let Some(u) = args.gpu_memory_utilization {
        cfg.kv.gpu_memory_utilization = u;
    }
    cfg.kv
        .calibrations
        .extend(args.kv_calibrations.iter().cloned());
    cfg.validate()?;
    let tenancy = match &args.tenants {
        Some(p) => Tenancy::from_file(p)?,
        None => Tenancy::open(&cfg.tenants),
    };
    let host: std::net::IpAddr = cfg
        .server
        .host
        .parse()
        .with_context(|| format!("--host `{}` is not an IP address", cfg.server.host))?;
    if tenancy.is_open() {
        if !host.is_loopback() && !cfg.server.allow_open {
            bail!(
                "no tenants file: the server has no authentication and may only listen on a \
                 loopback address; give --tenants FILE, or --allow-open on a trusted network"
            );
        }
        eprintln!("kvserve: no tenants file: one tenant, no API keys (listening on {host} only)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // The port opens before the model loads: `/health` answers, `/ready` says `loading`.
        let std_listener = std::net::TcpListener::bind((host, cfg.server.port))
            .with_context(|| format!("binding {host}:{}", cfg.server.port))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let loading_listener = tokio::net::TcpListener::from_std(std_listener.try_clone()?)?;
        eprintln!(
            "kvserve: loading {} (port {} open)",
            cfg.model.path.display(),
            addr.port()
        );
        let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel::<()>();
        let loading = tokio::spawn(kvserve::http::serve_loading(loading_listener, async move {
            let _ = loaded_rx.await;
        }));
        let start_cfg = cfg.clone();
        let device = args.device;
        let server = tokio::task::spawn_blocking(move || -> Result<kvserve::server::Server> {
            use kvserve::server::Server;
            Ok(match choose_backend(device, "kvserve: device")? {
                Chosen::Cpu(b) => Server::start_on(&start_cfg, tenancy, b)?,
                Chosen::Cuda(b) => Server::start_on(&start_cfg, tenancy, *b)?,
            })
        })
        .await??;
        if let Some(b) = &server.kv_budget {
            eprintln!("kvserve: {}", kvserve::engine::device_budget::describe(b));
        }
        let _ = loaded_tx.send(());
        loading.await??;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        println!("kvserve: listening on http://{addr}");
        std::io::stdout().flush()?;
        let state = server.state.clone();
        let engine = state.engine.clone();
        let grace = Duration::from_secs(cfg.server.failure_exit_secs);
        let stop = async move {
            tokio::select! {
                () = shutdown_signal() => {}
                cause = engine.failed() => {
                    eprintln!(
                        "kvserve: the engine failed ({cause}); exiting in {} s so that a \
                         supervisor restarts the server",
                        grace.as_secs()
                    );
                    tokio::time::sleep(grace).await;
                }
            }
        };
        kvserve::http::serve(listener, state.clone(), stop).await?;
        if let Some(cause) = state.engine.failure() {
            // No teardown: the engine thread has ended, and freeing memory on a lost device
            // only fails again.
            eprintln!("kvserve: exiting with status 1: the engine failed ({cause})");
            std::process::exit(1);
        }
        tokio::task::spawn_blocking(move || server.shutdown()).await?;
        anyhow::Ok(())
    })?;
    eprintln!("kvserve: drained, exiting");
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("kvserve: shutdown signal received, draining");
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    set_threads(args.threads)?;
    match choose_backend(args.device, "device:")? {
        Chosen::Cpu(b) => generate_on(args, b),
        Chosen::Cuda(b) => generate_on(args, *b),
    }
}

fn generate_on<B: Backend>(args: GenerateArgs, backend: B) -> Result<()> {
    let t_load = Instant::now();
    let files = loader::open_with(&args.model, args.weights)?;
    let mut model = Llama::from_files(&files, backend)?;
    drop(files.weights);
    kvserve::calibrate::attach_files(&mut model, &args.model, &args.kv_calibrations)?;
    tracing::info!(
        ms = t_load.elapsed().as_millis() as u64,
        weights = %model.weights_summary(),
        "model loaded"
    );
    let tok = &files.tokenizer;

    let prompt: Vec<u32> = match (&args.prompt, &args.prompt_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) if args.chat => {
            let tmpl = files
                .chat_template
                .as_ref()
                .context("this model has no chat template; drop --chat")?;
            let mut messages = Vec::new();
            if let Some(sys) = &args.system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: sys.clone(),
                });
            }
            messages.push(ChatMessage {
                role: "user".into(),
                content: text.clone(),
            });
            tok.encode(&tmpl.render(&messages, true)?, false)?
        }
        (Some(text), None) => tok.encode(text, true)?,
        (None, None) => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
    };

    let kv_policy = if args.kv_policy == "exact" {
        kvserve::kv::policy::KvPolicy::EXACT
    } else {
        kvserve::kv::policy::KvPolicy::parse(&args.kv_policy).map_err(anyhow::Error::msg)?
    };
    let opts = GenerateOptions {
        kv_policy,
        max_tokens: args.max_tokens,
        stop_ids: files.config.eos_token_ids.clone(),
        ignore_eos: args.ignore_eos,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            seed: args.seed,
            repetition_penalty: args.repetition_penalty,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            logit_bias: args.logit_bias.clone(),
            logprobs: args.json,
            top_logprobs: args.logprobs,
        },
    };

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut decoder = IncrementalDecoder::new();
    let mut io_err: Option<std::io::Error> = None;
    let stop_ids = opts.stop_ids.clone();
    let mut on_token = |s: &kvserve::engine::sampler::Sampled| {
        let res = if args.json {
            let text = tok.decode(&[s.token], false).unwrap_or_default();
            let line = serde_json::json!({
                "id": s.token,
                "text": text,
                "logprob": s.logprob,
                "top_logprobs": s.top_logprobs.iter().map(|&(id, lp)| serde_json::json!([id, lp])).collect::<Vec<_>>(),
            });
            writeln!(out, "{line}")
        } else if stop_ids.contains(&s.token) && !args.ignore_eos {
            Ok(())
        } else {
            match decoder.push(tok, s.token) {
                Ok(piece) => write!(out, "{piece}").and_then(|_| out.flush()),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            }
        };
        if let Err(e) = res {
            io_err.get_or_insert(e);
        }
    };
    let result = match args.kv_cache_bytes {
        None => generate(&model, &prompt, &opts, &mut on_token)?,
        Some(bytes) => {
            let kv_cfg = KvSection {
                cache_bytes: bytes,
                ..KvSection::default()
            };
            let (mut kv, budget) = PagedKv::new(
                &model,
                &kv_cfg,
                &kvserve::config::EngineSection::default(),
                &[TenantConfig::default()],
            )?;
            if let Some(b) = &budget {
                eprintln!("{}", kvserve::engine::device_budget::describe(b));
            }
            eprintln!(
                "KV pool: {} blocks of {} tokens ({} bytes; sealed blocks of a compressed policy weigh less)",
                kv.pool.stats().capacity / model.kv_bytes_per_block(kv_cfg.block_size),
                kv_cfg.block_size,
                kv.pool.stats().capacity
            );
            let scope = kv.pool.scope(TenantId(0), None);
            generate_paged(
                &model,
                &mut kv,
                TenantId(0),
                &scope,
                &prompt,
                &opts,
                &mut on_token,
            )?
        }
    };
    if !args.json {
        writeln!(out, "{}", decoder.finish(tok)?)?;
    }
    if let Some(e) = io_err {
        return Err(e.into());
    }
    let n = result.tokens.len();
    let prefill_s = result.prefill_time.as_secs_f64();
    let decode_s = result.decode_time.as_secs_f64();
    eprintln!(
        "prefill: {} tokens in {:.1} ms ({:.1} tok/s); decode: {} tokens in {:.1} ms ({:.1} tok/s); finish: {:?}",
        result.prompt_tokens,
        prefill_s * 1e3,
        result.prompt_tokens as f64 / prefill_s,
        n.saturating_sub(1),
        decode_s * 1e3,
        n.saturating_sub(1) as f64 / decode_s.max(1e-9),
        result.finish_reason,
    );
    Ok(())
}

fn run_eval(args: EvalArgs) -> Result<()> {
    set_threads(args.threads)?;
    match choose_backend(args.device, "device:")? {
        Chosen::Cpu(b) => eval_on(args, b),
        Chosen::Cuda(b) => eval_on(args, *b),
    }
}

fn eval_on<B: Backend>(args: EvalArgs, backend: B) -> Result<()> {
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    let files = loader::open(&args.model)?;
    let mut model = Llama::from_files(&files, backend)?;
    drop(files.weights);
    kvserve::calibrate::attach_files(&mut model, &args.model, &args.kv_calibrations)?;
    let mut cfg = EvalConfig::new(text, args.policies.clone());
    cfg.text_path = args.text.display().to_string();
    cfg.model_id = kvserve::eval::model_identity(&args.model);
    cfg.command = std::env::args().collect::<Vec<_>>().join(" ");
    cfg.ctx = args.ctx.clone();
    cfg.run = RunOptions {
        chunk: args.chunk,
        decode_tail: args.decode_tail,
    };
    cfg.max_windows = args.max_windows;
    cfg.passkey = args.passkey.clone();
    cfg.seed = args.seed;
    let t0 = Instant::now();
    let rep = kvserve::eval::evaluate(&model, &files.tokenizer, &cfg)?;
    eprintln!("eval: {:.1} s", t0.elapsed().as_secs_f64());
    let md = report::markdown(&rep);
    print!("{md}");
    let write = |path: &PathBuf, s: &str| {
        std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
    };
    if let Some(p) = &args.out_json {
        write(p, &rep.to_json())?;
    }
    if let Some(p) = &args.out_md {
        write(p, &md)?;
    }
    if let Some(p) = &args.out_png {
        report::write_png(&rep, p, std::path::Path::new(report::FONT_PATH))?;
    }
    Ok(())
}

fn run_calibrate(args: CalibrateArgs) -> Result<()> {
    use kvserve::calibrate::{calibrate, file, CalibrateOptions};
    use sha2::{Digest, Sha256};
    set_threads(args.threads)?;
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    let files = loader::open(&args.model)?;
    let model = Llama::from_files(&files, CpuBackend::new())?;
    drop(files.weights);
    let tokens = files.tokenizer.encode(&text, true)?;
    let opts = CalibrateOptions {
        rank: args.rank,
        ctx: args.ctx,
        max_tokens: args.max_tokens,
        allocation: args.ranks,
    };
    let t0 = Instant::now();
    let cal = calibrate(&model, &tokens, &opts)?;
    let fingerprint = file::model_fingerprint(&args.model)?;
    let name = |p: &PathBuf| {
        p.file_name().map_or_else(
            || p.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    };
    let sha = format!("{:x}", Sha256::digest(text.as_bytes()));
    let bytes = file::to_bytes(
        &cal,
        &fingerprint,
        &name(&args.model),
        (&name(&args.text), &sha),
    )
    .map_err(anyhow::Error::msg)?;
    std::fs::write(&args.out, &bytes).with_context(|| format!("writing {}", args.out.display()))?;
    let ranks: Vec<String> = cal.keys.layers.iter().map(|l| l.rank.to_string()).collect();
    let retained = cal.retained.iter().sum::<f64>() / cal.retained.len().max(1) as f64;
    eprintln!(
        "calibrated mhc:{} on {} tokens of {} in {:.1} s: ranks [{}], query-weighted key variance \
         kept {:.1} % (layer mean); wrote {} (id {})",
        args.rank,
        cal.tokens,
        args.text.display(),
        t0.elapsed().as_secs_f64(),
        ranks.join(","),
        100.0 * retained,
        args.out.display(),
        &blake3::hash(&bytes).to_hex()[..16]
    );
    Ok(())
}
