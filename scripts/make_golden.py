#!/usr/bin/env python3
"""Records reference outputs of Hugging Face transformers (float32, CPU) for the converted
default model, for kvserve's golden tests (tests/golden_smollm2.rs).

Usage (versions pinned in scripts/golden-requirements.txt):
    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install -r scripts/golden-requirements.txt
    /tmp/ref/bin/python scripts/make_golden.py models/SmolLM2-135M-Instruct tests/golden/smollm2.json

Records: tokenizer ids of tricky strings; rendered chat templates; for each prompt (plain and
chat-templated) the prompt ids, the greedy ids of the first 32 generated tokens (EOS ignored),
the top-5 logprobs at each step and the gap between the top-2 logprobs (so a tie can be told
apart from a bug).
"""
import hashlib
import json
import sys

import torch
import transformers
import tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

STEPS = 32
TOP = 5

TRICKY = [
    "Hello, world!",
    "1234567890",
    "The year 2024 had 366 days.",
    "\n\n  0.",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\n",
    "def f(x):\n    return x**2  # square\n",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "naïve café résumé",
    "日本語のテキスト",
    "مرحبا بالعالم ٣٤٥ ١٢",
    "x² … ½ … Ⅻ … ①",
    "emoji: 😀👍🏽🇫🇷 👨‍👩‍👧",
    "Ünïcödé ÅÆØ ß ẞ",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|> plain <repo_name>",
    "    indented\n        more",
    "a\u00a0b\u2003c",
    "Control chars: \x04\x06\x13 end",
    "URL https://example.com/path?q=1&r=2#frag",
    "Mixed123abc456 3.14159 -42 1e-5",
    "",
]

CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
]

PLAIN = [
    "In 1969, Neil Armstrong became",
    "The quick brown fox",
    "def fibonacci(n):",
    "List of prime numbers: 2, 3, 5, 7,",
    "Once upon a time, in a small village,",
    "日本の首都は",
]
CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for staying healthy.",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis in one sentence.",
]


@torch.no_grad()
def greedy(model, ids):
    input_ids = torch.tensor([ids])
    out = model(input_ids=input_ids, use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1].float()
    steps = []
    for _ in range(STEPS):
        lp = torch.log_softmax(logits, dim=-1)
        top = torch.topk(lp, TOP)
        tok = int(torch.argmax(logits))
        steps.append(
            {
                "id": tok,
                "logprob": float(lp[tok]),
                "top": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
                "top2_gap": float(top.values[0] - top.values[1]),
            }
        )
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
    return steps


def main():
    model_dir, out_path = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with open(f"{model_dir}/model.safetensors", "rb") as f:
        weights_sha = hashlib.sha256(f.read()).hexdigest()

    tokenizer_cases = [{"text": s, "ids": tok(s)["input_ids"]} for s in TRICKY]
    templates = []
    for msgs in CHATS:
        for gen in (True, False):
            templates.append(
                {
                    "messages": msgs,
                    "add_generation_prompt": gen,
                    "text": tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen),
                }
            )
    prompts = []
    for p in PLAIN:
        ids = tok(p)["input_ids"]
        prompts.append({"kind": "plain", "prompt": p, "prompt_ids": ids, "steps": greedy(model, ids)})
    for p in CHAT:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prompts.append({"kind": "chat", "prompt": p, "prompt_ids": ids, "steps": greedy(model, ids)})
        print(p, "->", repr(tok.decode([s["id"] for s in prompts[-1]["steps"]])), file=sys.stderr)

    golden = {
        "provenance": {
            "script": "scripts/make_golden.py",
            "model_dir": model_dir,
            "model_safetensors_sha256": weights_sha,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "dtype": "float32",
            "device": "cpu",
        },
        "tokenizer": tokenizer_cases,
        "chat_templates": templates,
        "prompts": prompts,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, indent=1)
    print(f"wrote {out_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
