#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/corpus/<target>/ (small, deterministic).

Run from the repository root after `scripts/fetch-model.sh` (a few seeds are cut from the real
model's files): python3 fuzz/make_seeds.py
"""
import json
import os
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- GGUF
def s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, ty, payload):
    return s(key) + struct.pack("<I", ty) + payload


def kv_u32(key, v):
    return kv(key, 4, struct.pack("<I", v))


def kv_f32(key, v):
    return kv(key, 6, struct.pack("<f", v))


def kv_str(key, v):
    return kv(key, 8, s(v))


def kv_bool(key, v):
    return kv(key, 7, bytes([1 if v else 0]))


def kv_str_array(key, items):
    return kv(key, 9, struct.pack("<IQ", 8, len(items)) + b"".join(s(i) for i in items))


def kv_i32_array(key, items):
    return kv(key, 9, struct.pack("<IQ", 5, len(items)) + b"".join(struct.pack("<i", i) for i in items))


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def gguf_file(kvs, tensors, align=32):
    """tensors: (name, ggml dims, type id, data bytes)"""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    off = 0
    for name, dims, ty, data in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, off)
        off = -(-(off + len(data)) // align) * align
    out += b"\0" * (-len(out) % align)
    for _, _, _, data in tensors:
        out += data + b"\0" * (-len(data) % align)
    return out


def f32s(n, salt):
    return b"".join(struct.pack("<f", ((salt + 7 * i) % 64 - 32) / 16) for i in range(n))


def tiny_gguf(template):
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + bytes_to_unicode() + ["hi", "ĠĠ"]
    types = [3, 3, 3] + [1] * 256 + [1, 1]
    vocab = len(tokens)
    kvs = [
        kv_str("general.architecture", "llama"),
        kv_u32("llama.block_count", 1),
        kv_u32("llama.context_length", 64),
        kv_u32("llama.embedding_length", 8),
        kv_u32("llama.feed_forward_length", 32),
        kv_u32("llama.attention.head_count", 2),
        kv_u32("llama.attention.head_count_kv", 1),
        kv_u32("llama.rope.dimension_count", 4),
        kv_f32("llama.rope.freq_base", 10000.0),
        kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5),
        kv_str("tokenizer.ggml.model", "gpt2"),
        kv_str("tokenizer.ggml.pre", "smollm"),
        kv_str_array("tokenizer.ggml.tokens", tokens),
        kv_i32_array("tokenizer.ggml.token_type", types),
        kv_str_array("tokenizer.ggml.merges", ["h i", "Ġ Ġ"]),
        kv_u32("tokenizer.ggml.bos_token_id", 1),
        kv_u32("tokenizer.ggml.eos_token_id", 2),
        kv_bool("tokenizer.ggml.add_bos_token", False),
        kv_str("tokenizer.chat_template", template),
    ]
    q8_0 = (struct.pack("<e", 0.5) + bytes(range(32))) * 2  # 2 blocks of 32
    q4_0 = (struct.pack("<e", 0.25) + bytes(range(16))) * 2
    q4_1 = (struct.pack("<ee", 0.25, -1.0) + bytes(range(16))) * 2
    tensors = [
        ("token_embd.weight", [8, vocab], 0, f32s(8 * vocab, 1)),
        ("output_norm.weight", [8], 0, f32s(8, 2)),
        ("blk.0.attn_norm.weight", [8], 0, f32s(8, 3)),
        ("blk.0.ffn_norm.weight", [8], 0, f32s(8, 4)),
        ("blk.0.attn_q.weight", [8, 8], 0, f32s(64, 5)),
        ("blk.0.attn_k.weight", [8, 4], 0, f32s(32, 6)),
        ("blk.0.attn_v.weight", [8, 4], 0, f32s(32, 7)),
        ("blk.0.attn_output.weight", [8, 8], 1, b"\x00\x3c" * 64),  # F16 ones
        ("blk.0.ffn_gate.weight", [32, 2], 8, q8_0),  # Q8_0
        ("blk.0.ffn_up.weight", [32, 2], 2, q4_0),  # Q4_0
        ("blk.0.ffn_down.weight", [32, 2], 3, q4_1),  # Q4_1
    ]
    return gguf_file(kvs, tensors)


with open(os.path.join(MODEL, "tokenizer_config.json")) as f:
    SMOL_TC = json.load(f)
SMOL_TEMPLATE = SMOL_TC["chat_template"]

put("gguf", "tiny_llama.gguf", tiny_gguf(SMOL_TEMPLATE))
put("gguf", "tiny_llama_no_template.gguf", tiny_gguf("{{ messages }}"))
with open(GGUF, "rb") as f:
    put("gguf", "smollm2_q4_1_head.gguf", f.read(4096))  # header + first metadata, truncated
put("gguf", "header_only.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv_u32("general.alignment", 64))

# ---------------------------------------------------------------- config.json
with open(os.path.join(MODEL, "config.json")) as f:
    smol_cfg = json.load(f)
put("config_json", "smollm2.json", json.dumps(smol_cfg))
qwen = dict(smol_cfg, architectures=["Qwen2ForCausalLM"], model_type="qwen2", head_dim=None,
            num_attention_heads=8, num_key_value_heads=2, hidden_size=512, eos_token_id=[2, 3],
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
del qwen["head_dim"]
put("config_json", "qwen2_llama3_rope.json", json.dumps(qwen))
mistral = {"model_type": "mistral", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4,
           "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}}
put("config_json", "mistral_rope_parameters.json", json.dumps(mistral))
put("config_json", "huge_layers.json", json.dumps(dict(smol_cfg, num_hidden_layers=10**12, hidden_size=10**12)))

# ---------------------------------------------------------------- safetensors
def safetensors_file(tensors, meta=None):
    header = {}
    data = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if meta:
        header["__metadata__"] = meta
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


put("safetensors", "three_dtypes.safetensors", safetensors_file([
    ("model.norm.weight", "F32", [4], f32s(4, 1)),
    ("model.embed_tokens.weight", "BF16", [3, 2], b"\x80\x3f" * 6),
    ("lm_head.weight", "F16", [2, 2], b"\x00\x3c" * 4),
    ("scalar", "F32", [], f32s(1, 2)),
], meta={"format": "pt"}))
put("safetensors", "empty_and_int.safetensors", safetensors_file([
    ("empty", "F32", [0, 4], b""),
    ("ints", "I32", [2], b"\x01\0\0\0\x02\0\0\0"),
]))

# ---------------------------------------------------------------- tokenizer.json
alpha = bytes_to_unicode()
vocab = {c: i for i, c in enumerate(alpha)}
vocab["<|eos|>"] = 256
merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")]
for i, (a, b) in enumerate(merges):
    vocab[a + b] = 257 + i
tiny_tok = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [{"id": 256, "content": "<|eos|>", "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True}],
    "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "post_processor": None,
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
              "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
}
put("tokenizer", "tiny_bytelevel_bpe.json", json.dumps(tiny_tok, ensure_ascii=False))
split = dict(tiny_tok, pre_tokenizer={"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "Split", "pattern": {"Regex": "\\s+|\\p{L}+"}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
    post_processor={"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|eos|>", "type_id": 0}},
                                                           {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {"<|eos|>": {"id": "<|eos|>", "ids": [256], "tokens": ["<|eos|>"]}}},
    normalizer={"type": "NFC"})
put("tokenizer", "tiny_split_template.json", json.dumps(split, ensure_ascii=False))
wordlevel = {"version": "1.0", "added_tokens": [], "normalizer": {"type": "Lowercase"},
             "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
             "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
             "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"}}
put("tokenizer", "wordlevel.json", json.dumps(wordlevel))
tc = {k: v for k, v in SMOL_TC.items() if k != "added_tokens_decoder"}
put("tokenizer", "smollm2_tokenizer_config.json", json.dumps(tc))

# ---------------------------------------------------------------- chat templates
put("chat_template", "smollm2.jinja", SMOL_TEMPLATE)
put("chat_template", "llama3_style.jinja",
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Today Date: ' + strftime_now('%d %b %Y') + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
put("chat_template", "tojson_namespace_macro.jinja",
    "{% macro render(m, depth) %}{% if depth > 0 %}{{ render(m, depth - 1) }}{% endif %}{{ m.role }}{% endmacro %}"
    "{% set ns = namespace(n=0, s='') %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% if m.role not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role ' ~ m.role) }}{% endif %}"
    "{% if loop.index > 10 %}{% break %}{% endif %}{{ render(m, 2) }}: {{ m.content.strip() | tojson(indent=2) }}\n"
    "{% endfor %}{{ {'n': ns.n, 'x': [1, 2.5, none, true]} | tojson(sort_keys=true) }}"
    "{% generation %}{{ eos_token }}{% endgeneration %}")
put("chat_template", "loops.jinja",
    "{% for i in range(10) %}{% for j in range(i) %}{{ j }}{% endfor %}{% endfor %}"
    "{{ 'ab' * 3 }}{{ messages | map(attribute='content') | join(', ') }}{{ messages|length }}")

# ---------------------------------------------------------------- request bodies
reqs = {
    "chat_min.json": {"messages": [{"role": "user", "content": "Hi"}]},
    "chat_full.json": {"model": "SmolLM2-135M-Instruct", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Count: "}, {"type": "text", "text": "1 2 3"}]},
        {"role": "assistant", "content": "4"}],
        "max_completion_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "n": 2,
        "seed": 7, "stop": ["\n", "END"], "logit_bias": {"42": -100, "7": 5.5}, "logprobs": True,
        "top_logprobs": 3, "stream": True, "stream_options": {"include_usage": True},
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1,
        "kv_policy": "kivi4+window:1024", "cache_salt": "tenant-a", "priority": 3, "ignore_eos": False,
        "min_tokens": 1, "stop_token_ids": [2], "unknown_field": {"x": 1}},
    "completion_text.json": {"prompt": "Once upon a time", "max_tokens": 16, "echo": True, "logprobs": 2},
    "completion_tokens.json": {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 4, "n": 1, "best_of": 1},
    "completion_texts.json": {"prompt": ["a", "b"], "stop": "x", "suffix": "", "kv_policy": "bf16"},
    "completion_bad.json": {"prompt": [49152], "max_tokens": -1, "temperature": 9.0},
}
for name, body in reqs.items():
    put("request", name, json.dumps(body, ensure_ascii=False))
print("seeds written under", OUT)
