//! Correctness on the real default model against Hugging Face transformers (float32, CPU):
//! tokenizer ids, chat-template text, greedy tokens and top-5 logprobs of the first 32 tokens
//! for plain and chat prompts. The reference is tests/golden/smollm2.json, made by
//! scripts/make_golden.py (see tests/golden/README.md). Also: the `.gguf` file and its
//! converted directory give the same logits, and the `.gguf` file with its quantized matrices
//! kept as stored matches the reference too.

use kvserve::backend::cpu::CpuBackend;
use kvserve::engine::generate::{generate, GenerateOptions};
use kvserve::error::ModelError;
use kvserve::model::chat_template::ChatMessage;
use kvserve::model::gguf::GgufFile;
use kvserve::model::llama::{Llama, LogitsFor, SeqStep};
use kvserve::model::loader::{self, ModelFiles, WeightFormat};
use kvserve::model::tensor::{HostData, HostTensor};
use kvserve::model::TensorSource;
use kvserve::types::SamplingParams;
use serde::Deserialize;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const MODEL_DIR: &str = "models/SmolLM2-135M-Instruct";
const GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Deserialize)]
struct Golden {
    tokenizer: Vec<TokCase>,
    chat_templates: Vec<TemplateCase>,
    prompts: Vec<PromptCase>,
}
#[derive(Deserialize)]
struct TokCase {
    text: String,
    ids: Vec<u32>,
}
#[derive(Deserialize)]
struct TemplateCase {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    text: String,
}
#[derive(Deserialize)]
struct PromptCase {
    kind: String,
    prompt: String,
    prompt_ids: Vec<u32>,
    steps: Vec<Step>,
}
#[derive(Deserialize)]
struct Step {
    id: u32,
    top: Vec<(u32, f32)>,
    top2_gap: f32,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden() -> Golden {
    let text = std::fs::read_to_string(root().join("tests/golden/smollm2.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn model_path(rel: &str) -> PathBuf {
    let p = root().join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh first (these tests need the real model)",
        p.display()
    );
    p
}

struct Loaded {
    files: ModelFiles,
    model: Llama<CpuBackend>,
}

fn load(path: &Path) -> Loaded {
    load_with(path, WeightFormat::Bf16)
}

fn load_with(path: &Path, weights: WeightFormat) -> Loaded {
    let files = loader::open_with(path, weights).unwrap();
    let model = Llama::load(
        files.config.clone(),
        files.weights.as_ref(),
        CpuBackend::new(),
    )
    .unwrap();
    Loaded { files, model }
}

fn dir_model() -> &'static Loaded {
    static M: OnceLock<Loaded> = OnceLock::new();
    M.get_or_init(|| load(&model_path(MODEL_DIR)))
}

#[test]
fn tokenizer_ids_match_transformers() {
    let m = dir_model();
    let gguf = loader::open(&model_path(GGUF)).unwrap();
    let mut failures = Vec::new();
    for case in golden().tokenizer {
        let ours = m.files.tokenizer.encode(&case.text, true).unwrap();
        if ours != case.ids {
            failures.push(format!(
                "{:?}: ours {:?} != ref {:?}",
                case.text, ours, case.ids
            ));
        }
        // The tokenizer built straight from GGUF metadata must agree too.
        let from_gguf = gguf.tokenizer.encode(&case.text, true).unwrap();
        if from_gguf != case.ids {
            failures.push(format!(
                "(gguf) {:?}: {:?} != {:?}",
                case.text, from_gguf, case.ids
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn chat_template_text_matches_transformers() {
    let m = dir_model();
    let tmpl = m
        .files
        .chat_template
        .as_ref()
        .expect("model has a chat template");
    for case in golden().chat_templates {
        let ours = tmpl
            .render(&case.messages, case.add_generation_prompt)
            .unwrap();
        assert_eq!(ours, case.text);
    }
}

#[test]
fn greedy_tokens_and_logprobs_match_transformers() {
    let d = check_against_transformers(dir_model(), 1e-2, 1e-4);
    eprintln!("converted directory: max |logprob diff| = {d:.2e}");
}

/// The GGUF file with its Q4_1 / Q8_0 matrices multiplied as stored: the file's exact weights
/// where the reference (and the converted directory) hold them rounded to bf16, which moves
/// logprobs by up to 0.12 over the golden prompts (measured) and flips one near-tie (a top-2 gap
/// of 0.011). So this holds the native model to 0.25 and to ties under 0.05; its exactness is
/// checked bit for bit by `native_gguf_weights_give_the_bits_of_their_f32_values`.
#[test]
fn native_gguf_weights_match_transformers() {
    let m = load_with(&model_path(GGUF), WeightFormat::Native);
    let formats: Vec<_> = m.model.matrix_formats().into_iter().map(|f| f.0).collect();
    // The embedding table (also the tied LM head) is Q8_0; every layer matrix Q4_1.
    assert_eq!(formats[0], "q8_0", "{formats:?}");
    assert!(formats[1..].iter().all(|&f| f == "q4_1"), "{formats:?}");
    assert_eq!(formats.len(), 1 + 30 * 4);
    let d = check_against_transformers(&m, 0.25, 0.05);
    eprintln!("native gguf: max |logprob diff| = {d:.2e}");
}

/// Greedy tokens and top-5 logprobs of every golden prompt within `tol` of the reference; a
/// different token only where the reference's top two are a near-tie. Returns the largest
/// logprob difference.
fn check_against_transformers(m: &Loaded, tol: f32, tie: f32) -> f32 {
    let cases = golden().prompts;
    assert!(cases.len() >= 10);
    let mut near_ties = Vec::new();
    let mut max_lp_diff = 0f32;
    for case in &cases {
        if case.kind == "chat" {
            let msgs = [ChatMessage {
                role: "user".into(),
                content: case.prompt.clone(),
            }];
            let text = m
                .files
                .chat_template
                .as_ref()
                .unwrap()
                .render(&msgs, true)
                .unwrap();
            assert_eq!(
                m.files.tokenizer.encode(&text, false).unwrap(),
                case.prompt_ids
            );
        } else {
            assert_eq!(
                m.files.tokenizer.encode(&case.prompt, true).unwrap(),
                case.prompt_ids
            );
        }
        let opts = GenerateOptions {
            kv_policy: kvserve::kv::policy::KvPolicy::EXACT,
            max_tokens: case.steps.len(),
            stop_ids: vec![],
            ignore_eos: true,
            sampling: SamplingParams {
                top_logprobs: 5,
                ..Default::default()
            },
        };
        let out = generate(&m.model, &case.prompt_ids, &opts, |_| {}).unwrap();
        for (i, (ours, want)) in out.tokens.iter().zip(&case.steps).enumerate() {
            // Logprobs of the reference's top-5 alternatives, compared by id.
            for &(id, lp) in &want.top {
                if let Some(&(_, ours_lp)) = ours.top_logprobs.iter().find(|(oid, _)| *oid == id) {
                    max_lp_diff = max_lp_diff.max((ours_lp - lp).abs());
                    assert!(
                        (ours_lp - lp).abs() < tol,
                        "{:?} step {i}: logprob of {id}: ours {ours_lp} ref {lp}",
                        case.prompt
                    );
                } else {
                    // Only acceptable at the edge of the top-5 where values are nearly equal.
                    let fifth = want.top[4].1;
                    assert!(
                        (lp - fifth).abs() < tol,
                        "{:?} step {i}: {id} missing from our top-5",
                        case.prompt
                    );
                }
            }
            if ours.token != want.id {
                assert!(
                    want.top2_gap < tie,
                    "{:?} step {i}: ours {} ref {} (ref top-2 gap {})",
                    case.prompt,
                    ours.token,
                    want.id,
                    want.top2_gap
                );
                near_ties.push(format!(
                    "{:?} step {i} (gap {})",
                    case.prompt, want.top2_gap
                ));
                break; // The sequences diverge from here on.
            }
        }
    }
    eprintln!("divergences at near-ties: {near_ties:?}");
    max_lp_diff
}

/// The file's weights dequantized to f32 (ggml's reference decoders), every other tensor as the
/// loader gives it: the model native weights must equal bit for bit.
struct ExactF32(GgufFile);

impl TensorSource for ExactF32 {
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn has(&self, hf_name: &str) -> bool {
        self.0.has(hf_name)
    }
    fn tensor(&self, hf_name: &str) -> Result<HostTensor<'_>, ModelError> {
        let t = self.0.tensor(hf_name)?;
        let data = match self.0.quantized_tensor(hf_name)? {
            Some(_) => t.data,
            None => HostData::Bf16(Cow::Owned(t.data.to_bf16())),
        };
        Ok(HostTensor { data, ..t })
    }
}

/// Native weights follow the matmul contract: the same bits as an f32 model of their
/// dequantized values, through a prompt step and batched decode steps.
#[test]
fn native_gguf_weights_give_the_bits_of_their_f32_values() {
    let native = load_with(&model_path(GGUF), WeightFormat::Native);
    let src = ExactF32(GgufFile::open(&model_path(GGUF)).unwrap());
    let exact = Llama::load(native.files.config.clone(), &src, CpuBackend::new()).unwrap();
    assert!(exact.matrix_formats().iter().all(|f| f.0 == "f32"));
    let tok = &native.files.tokenizer;
    let a = tok
        .encode("The KV cache is the heart of serving.", true)
        .unwrap();
    let b = tok.encode("Quantized weights, exactly.", true).unwrap();
    let run = |m: &Llama<CpuBackend>| {
        let mut store = m.new_kv_store(8, 16);
        let mut logits = Vec::new();
        let (mut ta, mut tb) = (a.clone(), b.clone());
        for step in 0..4 {
            // Step 0: both prompts; then both sequences decode their greedy token together.
            let (sa, sb) = if step == 0 {
                (&ta[..], &tb[..])
            } else {
                (&ta[ta.len() - 1..], &tb[tb.len() - 1..])
            };
            let steps = [
                SeqStep {
                    policy: kvserve::kv::policy::KvPolicy::EXACT,
                    tokens: sa,
                    start_pos: ta.len() - sa.len(),
                    block_table: &[0, 1, 2, 3],
                    logits: LogitsFor::Last,
                },
                SeqStep {
                    policy: kvserve::kv::policy::KvPolicy::EXACT,
                    tokens: sb,
                    start_pos: tb.len() - sb.len(),
                    block_table: &[4, 5, 6, 7],
                    logits: LogitsFor::Last,
                },
            ];
            let out = m.forward(&steps, &mut store).unwrap();
            let argmax = |r: &[f32]| {
                r.iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                    .0 as u32
            };
            ta.push(argmax(&out[0]));
            tb.push(argmax(&out[1]));
            logits.push(out);
        }
        logits
    };
    let (n, e) = (run(&native.model), run(&exact));
    for (i, (n, e)) in n.iter().zip(&e).enumerate() {
        for (n, e) in n.iter().zip(e) {
            assert_eq!(n.len(), 49152);
            assert!(
                n.iter().zip(e).all(|(x, y)| x.to_bits() == y.to_bits()),
                "step {i}: native and f32 logits differ"
            );
        }
    }
}

#[test]
fn gguf_and_converted_directory_give_identical_logits() {
    let dir = dir_model();
    let gguf = load(&model_path(GGUF));
    assert_eq!(gguf.files.config.num_layers, 30);
    let prompt = dir
        .files
        .tokenizer
        .encode("The KV cache is the heart of serving.", true)
        .unwrap();
    let step = [SeqStep {
        policy: kvserve::kv::policy::KvPolicy::EXACT,
        tokens: &prompt,
        start_pos: 0,
        block_table: &[0, 1, 2, 3],
        logits: LogitsFor::All,
    }];
    let a = dir
        .model
        .forward(&step, &mut dir.model.new_kv_store(4, 16))
        .unwrap();
    let b = gguf
        .model
        .forward(&step, &mut gguf.model.new_kv_store(4, 16))
        .unwrap();
    assert_eq!(a, b);
}
