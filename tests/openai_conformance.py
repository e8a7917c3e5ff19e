#!/usr/bin/env python3
"""OpenAI API conformance of `kvserve serve`, checked with the official `openai` Python package.

Starts the real server (target/release/kvserve, CPU, the real SmolLM2-135M-Instruct model) on
127.0.0.1 with an OS-chosen port and a tenants file of two tenants (alpha, beta) that this script
writes itself, runs every check against it, stops it with SIGTERM (it must drain and exit 0),
prints a summary and exits non-zero if any check failed.

    .venv-ci/bin/python tests/openai_conformance.py [-k SUBSTRING] [-v]

Environment: KVSERVE_BIN (default target/release/kvserve), KVSERVE_MODEL (default
models/SmolLM2-135M-Instruct), KVSERVE_ADDR=HOST:PORT to test an already running server
instead (it must use the keys below; nothing is started or stopped then).

Every request keeps max_tokens <= 16 so the whole run stays well under two minutes on two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import openai

# tests/kvserve_launch.py, found next to this script.
from kvserve_launch import MODEL_PATH, STOP_TIMEOUT_S, Server, missing_inputs

# The served model id: the model directory's name (config `server.served_model_name` empty).
MODEL = MODEL_PATH.name

KEYS = {
    "alpha": "sk-kvserve-conformance-alpha-7f3a91",
    "beta": "sk-kvserve-conformance-beta-c20e5d",
}
WRONG_KEY = "sk-kvserve-conformance-not-a-key"

PROMPT = "The capital of France is"
STORY_PROMPT = "Once upon a time, in a small village by the sea, there lived"
CHAT = [{"role": "user", "content": "Name three colors of the rainbow."}]
# ~100 tokens of plain English (prefix-cache checks prepend a unique nonce).
PARAGRAPH = (
    "The library opened at nine every morning, and the first visitors were usually students "
    "who needed a quiet place to read before their classes began. The librarian, a patient "
    "woman with silver hair, knew most of them by name and often recommended books that "
    "matched their interests. On rainy days the reading room filled quickly, and the sound "
    "of turning pages mixed with the soft patter of water against the tall windows. In the "
    "afternoon, children arrived for story hour."
)


# ---------------------------------------------------------------------------------------------
# The server


def write_tenants(path: Path) -> None:
    lines = []
    for tenant, key in KEYS.items():
        digest = hashlib.sha256(key.encode()).hexdigest()
        lines += [
            "[[tenant]]",
            f'id = "{tenant}"',
            f'api_keys_sha256 = ["{digest}"]',
            "max_concurrent = 8",
            "requests_per_minute = 1000",
            "tokens_per_minute = 1000000",
            "",
        ]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Helpers

ADDR = ""
CHECKS: list = []


def check(fn):
    CHECKS.append(fn)
    return fn


def client(tenant: str = "alpha", key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://{ADDR}/v1",
        api_key=key if key is not None else KEYS[tenant],
        max_retries=0,
        timeout=60,
    )


def dump(obj) -> str:
    """A response as JSON, for failure messages."""
    try:
        return obj.model_dump_json(exclude_unset=True)
    except Exception:
        return repr(obj)


def expect(cond: bool, what: str, obj=None) -> None:
    if not cond:
        raise AssertionError(what + (f"\n    response: {dump(obj)}" if obj is not None else ""))


def check_usage(usage, obj, max_tokens: int | None = None) -> None:
    expect(usage is not None, "usage missing", obj)
    expect(isinstance(usage.prompt_tokens, int) and usage.prompt_tokens > 0,
           f"usage.prompt_tokens = {usage.prompt_tokens!r}", obj)
    expect(isinstance(usage.completion_tokens, int) and usage.completion_tokens >= 0,
           f"usage.completion_tokens = {usage.completion_tokens!r}", obj)
    expect(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
           "usage.total_tokens != prompt_tokens + completion_tokens", obj)
    if max_tokens is not None:
        expect(usage.completion_tokens <= max_tokens,
               f"usage.completion_tokens {usage.completion_tokens} > max_tokens {max_tokens}", obj)
    details = usage.prompt_tokens_details
    expect(details is not None and isinstance(details.cached_tokens, int),
           "usage.prompt_tokens_details.cached_tokens missing", obj)
    expect(0 <= details.cached_tokens <= usage.prompt_tokens,
           f"cached_tokens {details.cached_tokens} outside 0..=prompt_tokens", obj)


def check_finish(choice, obj, usage=None, max_tokens: int | None = None) -> None:
    expect(choice.finish_reason in ("stop", "length"),
           f"finish_reason = {choice.finish_reason!r}, expected stop or length", obj)
    if (usage is not None and max_tokens is not None and choice.finish_reason == "length"):
        expect(usage.completion_tokens == max_tokens,
               f"finish_reason length but completion_tokens {usage.completion_tokens} "
               f"!= max_tokens {max_tokens}", obj)


def still_serving(tenant: str = "alpha") -> None:
    """A normal request succeeds (after an error)."""
    r = client(tenant).completions.create(model=MODEL, prompt="Hello", max_tokens=2,
                                          temperature=0)
    expect(len(r.choices) == 1 and isinstance(r.choices[0].text, str),
           "normal request after an error did not succeed", r)


def expect_error(exc_type, status: int, call, param: str | None = None) -> openai.APIStatusError:
    try:
        r = call()
    except exc_type as e:
        expect(e.status_code == status, f"status {e.status_code}, expected {status}")
        body = e.body
        expect(isinstance(body, dict), f"error body is not the OpenAI envelope: {e.response.text}")
        for field in ("message", "type", "param", "code"):
            expect(field in body, f"error.{field} missing: {e.response.text}")
        expect(isinstance(body["message"], str) and body["message"],
               f"error.message empty: {e.response.text}")
        expect(isinstance(body["code"], str), f"error.code not a string: {e.response.text}")
        if param is not None:
            expect(body["param"] == param,
                   f"error.param = {body['param']!r}, expected {param!r}: {e.response.text}")
        return e
    except openai.APIStatusError as e:
        raise AssertionError(f"expected {exc_type.__name__} ({status}), got "
                             f"{type(e).__name__} {e.status_code}: {e.response.text}")
    raise AssertionError(f"expected {exc_type.__name__} ({status}), the request succeeded: "
                         f"{dump(r)}")


def collect_chat_stream(stream):
    """(chunks, {index: text}, {index: finish_reason count}, usage chunk or None)."""
    chunks = list(stream)
    texts: dict[int, str] = {}
    finishes: dict[int, int] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason is not None:
                finishes[ch.index] = finishes.get(ch.index, 0) + 1
    return chunks, texts, finishes


def collect_completion_stream(stream):
    chunks = list(stream)
    texts: dict[int, str] = {}
    finishes: dict[int, int] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.text or "")
            if ch.finish_reason is not None:
                finishes[ch.index] = finishes.get(ch.index, 0) + 1
    return chunks, texts, finishes


def check_stream_shape(chunks, finishes, n: int, include_usage: bool, object_name: str,
                       id_prefix: str) -> None:
    expect(len(chunks) >= 2, f"only {len(chunks)} chunk(s)")
    ids = {c.id for c in chunks}
    expect(len(ids) == 1, f"chunk ids differ: {sorted(ids)}")
    expect(chunks[0].id.startswith(id_prefix), f"id {chunks[0].id!r} lacks {id_prefix!r}")
    for c in chunks:
        expect(c.object == object_name, f"chunk object {c.object!r}, expected {object_name!r}", c)
        expect(c.model == MODEL, f"chunk model {c.model!r}", c)
    expect(finishes == {i: 1 for i in range(n)},
           f"finish_reason chunks per choice = {finishes}, expected exactly one for each of "
           f"{list(range(n))}")
    if include_usage:
        last = chunks[-1]
        expect(last.choices == [], "last chunk (include_usage) has choices", last)
        expect(last.usage is not None, "last chunk (include_usage) has no usage", last)
        for c in chunks[:-1]:
            expect(c.choices, "a chunk before the last has choices == []", c)
            expect(c.usage is None, "a chunk before the last carries usage", c)
    else:
        for c in chunks:
            expect(c.choices, "chunk with choices == [] without include_usage", c)
            expect(c.usage is None, "chunk carries usage without include_usage", c)


# ---------------------------------------------------------------------------------------------
# Checks (run in this order)


@check
def models_list():
    models = client().models.list()
    ids = [m.id for m in models.data]
    expect(MODEL in ids, f"{MODEL!r} not in /v1/models ids {ids}", models)
    m = next(m for m in models.data if m.id == MODEL)
    expect(m.object == "model", f"model.object = {m.object!r}", m)


@check
def completion_basic():
    r = client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    expect(r.id.startswith("cmpl-"), f"id {r.id!r} does not start with cmpl-", r)
    expect(r.object == "text_completion", f"object {r.object!r}", r)
    expect(isinstance(r.created, int) and r.created > 1_600_000_000, f"created {r.created!r}", r)
    expect(r.model == MODEL, f"model {r.model!r}", r)
    expect(len(r.choices) == 1, f"{len(r.choices)} choices", r)
    c = r.choices[0]
    expect(c.index == 0, "choices[0].index != 0", r)
    expect(isinstance(c.text, str) and c.text, "choices[0].text empty", r)
    expect(c.logprobs is None, "logprobs present though not requested", r)
    check_usage(r.usage, r, max_tokens=8)
    check_finish(c, r, r.usage, 8)


@check
def chat_basic():
    r = client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                         temperature=0)
    expect(r.id.startswith("chatcmpl-"), f"id {r.id!r} does not start with chatcmpl-", r)
    expect(r.object == "chat.completion", f"object {r.object!r}", r)
    expect(isinstance(r.created, int) and r.created > 1_600_000_000, f"created {r.created!r}", r)
    expect(r.model == MODEL, f"model {r.model!r}", r)
    expect(len(r.choices) == 1, f"{len(r.choices)} choices", r)
    c = r.choices[0]
    expect(c.index == 0, "choices[0].index != 0", r)
    expect(c.message.role == "assistant", f"message.role {c.message.role!r}", r)
    expect(isinstance(c.message.content, str) and c.message.content, "message.content empty", r)
    check_usage(r.usage, r, max_tokens=12)
    check_finish(c, r, r.usage, 12)
    # max_completion_tokens is the newer name of max_tokens.
    r2 = client().chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=12,
                                          temperature=0)
    expect(r2.choices[0].message.content == c.message.content,
           "max_completion_tokens=12 gave a different text than max_tokens=12", r2)


@check
def chat_system_and_parts():
    """A system message, an assistant turn, and content as a list of text parts."""
    msgs = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Name three colors"},
                                     {"type": "text", "text": " of the rainbow."}]},
    ]
    r = client().chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                         temperature=0)
    expect(r.choices[0].message.role == "assistant", "role", r)
    check_usage(r.usage, r, max_tokens=8)


@check
def chat_streaming_include_usage():
    kw = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    full = client().chat.completions.create(**kw)
    chunks, texts, finishes = collect_chat_stream(client().chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    check_stream_shape(chunks, finishes, 1, True, "chat.completion.chunk", "chatcmpl-")
    first = chunks[0]
    expect(first.choices and first.choices[0].delta.role == "assistant",
           "first chunk's delta.role is not 'assistant'", first)
    want = full.choices[0].message.content
    expect(texts.get(0) == want,
           f"streamed text {texts.get(0)!r} != non-streamed text {want!r} at temperature 0")
    fin = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    expect(fin == [full.choices[0].finish_reason],
           f"streamed finish_reason {fin} != non-streamed {full.choices[0].finish_reason!r}")
    u, fu = chunks[-1].usage, full.usage
    expect((u.prompt_tokens, u.completion_tokens) == (fu.prompt_tokens, fu.completion_tokens),
           f"streamed usage {u} != non-streamed usage {fu}")


@check
def completion_streaming_include_usage():
    kw = dict(model=MODEL, prompt=STORY_PROMPT, max_tokens=12, temperature=0)
    full = client().completions.create(**kw)
    chunks, texts, finishes = collect_completion_stream(client().completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    check_stream_shape(chunks, finishes, 1, True, "text_completion", "cmpl-")
    want = full.choices[0].text
    expect(texts.get(0) == want,
           f"streamed text {texts.get(0)!r} != non-streamed text {want!r} at temperature 0")
    fin = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    expect(fin == [full.choices[0].finish_reason],
           f"streamed finish_reason {fin} != non-streamed {full.choices[0].finish_reason!r}")
    u, fu = chunks[-1].usage, full.usage
    expect((u.prompt_tokens, u.completion_tokens) == (fu.prompt_tokens, fu.completion_tokens),
           f"streamed usage {u} != non-streamed usage {fu}")
    # Without include_usage: no usage chunk at all.
    chunks, texts, finishes = collect_completion_stream(client().completions.create(
        **kw, stream=True))
    check_stream_shape(chunks, finishes, 1, False, "text_completion", "cmpl-")
    expect(texts.get(0) == want, f"streamed text (no usage) {texts.get(0)!r} != {want!r}")


@check
def n_equals_2():
    r = client().completions.create(model=MODEL, prompt=STORY_PROMPT, max_tokens=8,
                                    temperature=0.9, n=2, seed=7)
    expect(sorted(c.index for c in r.choices) == [0, 1],
           f"choice indices {[c.index for c in r.choices]}", r)
    for c in r.choices:
        check_finish(c, r)
    expect(r.usage.completion_tokens <= 16, "usage.completion_tokens > n * max_tokens", r)
    r = client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                         temperature=0.9, n=2, seed=7)
    expect(sorted(c.index for c in r.choices) == [0, 1],
           f"chat choice indices {[c.index for c in r.choices]}", r)
    for c in r.choices:
        expect(c.message.role == "assistant", "role", r)
        check_finish(c, r)
    # Streaming, n=2: exactly one finish_reason chunk per choice, then the usage chunk.
    chunks, texts, finishes = collect_chat_stream(client().chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0.9, n=2, seed=7, stream=True,
        stream_options={"include_usage": True}))
    check_stream_shape(chunks, finishes, 2, True, "chat.completion.chunk", "chatcmpl-")
    expect(sorted(texts) == [0, 1], f"streamed choice indices {sorted(texts)}")


@check
def completion_logprobs():
    r = client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                    logprobs=2)
    c = r.choices[0]
    lp = c.logprobs
    expect(lp is not None, "choices[0].logprobs missing", r)
    n = r.usage.completion_tokens
    lens = {k: len(getattr(lp, k) or []) for k in
            ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    expect(set(lens.values()) == {n}, f"logprobs lengths {lens} != completion_tokens {n}", r)
    for i, (tok, tl, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        expect(isinstance(tok, str), f"tokens[{i}] not a string", r)
        expect(isinstance(tl, float) and tl <= 0, f"token_logprobs[{i}] = {tl!r}", r)
        expect(isinstance(top, dict) and 1 <= len(top) <= 2,
               f"top_logprobs[{i}] has {len(top or {})} entries, expected 2", r)
        expect(all(v <= 0 for v in top.values()), f"top_logprobs[{i}] has a value > 0", r)
        # Greedy: the chosen token is the most likely one.
        expect(tl >= max(top.values()) - 1e-3,
               f"greedy token_logprobs[{i}] {tl} < best top_logprob {max(top.values())}", r)
    offs = lp.text_offset
    expect(all(b >= a for a, b in zip(offs, offs[1:])), f"text_offset not monotone: {offs}", r)
    if c.text.isascii():
        expect("".join(lp.tokens) == c.text,
               f"tokens joined {''.join(lp.tokens)!r} != text {c.text!r}", r)
        expect(all(b - a == len(t) for a, b, t in zip(offs, offs[1:], lp.tokens)),
               f"text_offset steps {offs} do not match token lengths", r)


@check
def chat_logprobs():
    r = client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                         temperature=0, logprobs=True, top_logprobs=2)
    c = r.choices[0]
    expect(c.logprobs is not None and c.logprobs.content is not None,
           "choices[0].logprobs.content missing", r)
    content = c.logprobs.content
    expect(len(content) == r.usage.completion_tokens,
           f"{len(content)} logprob entries != completion_tokens {r.usage.completion_tokens}", r)
    for i, t in enumerate(content):
        expect(isinstance(t.token, str), f"content[{i}].token", r)
        expect(isinstance(t.logprob, float) and t.logprob <= 0, f"content[{i}].logprob", r)
        expect(t.top_logprobs is not None and len(t.top_logprobs) == 2,
               f"content[{i}].top_logprobs has {len(t.top_logprobs or [])} entries, expected 2", r)
        for j, alt in enumerate(t.top_logprobs):
            expect(isinstance(alt.token, str) and alt.logprob <= 0,
                   f"content[{i}].top_logprobs[{j}]", r)
        expect(t.logprob >= max(a.logprob for a in t.top_logprobs) - 1e-3,
               f"greedy content[{i}].logprob below the best alternative", r)
    if c.message.content.isascii():
        joined = "".join(t.token for t in content)
        expect(joined == c.message.content,
               f"logprob tokens joined {joined!r} != content {c.message.content!r}", r)
    # Without logprobs: none in the response.
    r = client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                         temperature=0)
    expect(r.choices[0].logprobs is None, "logprobs present though not requested", r)


@check
def completion_echo():
    r = client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                    echo=True, logprobs=1)
    c = r.choices[0]
    expect(c.text.startswith(PROMPT), f"echo text {c.text!r} does not start with the prompt", r)
    lp = c.logprobs
    expect(lp is not None and lp.token_logprobs, "echo logprobs missing", r)
    expect(lp.token_logprobs[0] is None,
           f"first token_logprob is {lp.token_logprobs[0]!r}, expected None", r)
    expect(all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:]),
           "echo token_logprobs[1:] not all floats <= 0", r)
    u = r.usage
    want = u.prompt_tokens + u.completion_tokens
    lens = {k: len(getattr(lp, k) or []) for k in
            ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    expect(set(lens.values()) == {want},
           f"echo logprobs lengths {lens} != prompt_tokens + completion_tokens = {want}", r)
    expect(lp.text_offset[0] == 0, f"echo text_offset[0] = {lp.text_offset[0]}", r)
    if c.text.isascii():
        expect("".join(lp.tokens) == c.text, f"echo tokens joined != text", r)


def pick_stop(text: str) -> tuple[str, str]:
    """A whole word of `text` after its first one, and a string that spans a space."""
    words = [m for m in re.finditer(r"[A-Za-z]{3,}", text)]
    expect(len(words) >= 2, f"greedy output {text!r} has too few words to choose a stop from")
    w = words[1]
    word = w.group(0)
    # The last two letters of one word, the space, the first two letters of the next.
    cross = None
    for a, b in zip(words, words[1:]):
        if text[a.end():b.start()] == " ":
            cross = a.group(0)[-2:] + " " + b.group(0)[:2]
            break
    expect(cross is not None, f"no two space-separated words in {text!r}")
    return word, cross


@check
def stop_strings():
    kw = dict(model=MODEL, prompt=STORY_PROMPT, max_tokens=16, temperature=0)
    base = client().completions.create(**kw).choices[0].text
    word, cross = pick_stop(base)
    for stop in (word, cross):
        want = base[:base.index(stop)]
        r = client().completions.create(**kw, stop=[stop, "\u00a7never\u00a7"])
        c = r.choices[0]
        expect(stop not in c.text, f"text {c.text!r} contains the stop string {stop!r}", r)
        expect(c.finish_reason == "stop", f"finish_reason {c.finish_reason!r} with stop {stop!r}"
               f" (greedy text without stop: {base!r})", r)
        expect(c.text == want, f"stop {stop!r}: text {c.text!r}, expected {want!r}", r)
        # Streaming: the stop string is never emitted, not even partly, then taken back.
        chunks, texts, finishes = collect_completion_stream(client().completions.create(
            **kw, stop=stop, stream=True))
        expect(texts.get(0) == want,
               f"streamed with stop {stop!r}: {texts.get(0)!r}, expected {want!r}")
        expect(finishes == {0: 1}, f"streamed finish chunks {finishes}")
    # Chat with a stop string too.
    kwc = dict(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    base = client().chat.completions.create(**kwc).choices[0].message.content
    words = re.findall(r"[A-Za-z]{3,}", base)
    if len(words) >= 2:
        stop = words[1]
        r = client().chat.completions.create(**kwc, stop=stop)
        got = r.choices[0].message.content
        expect(stop not in got and got == base[:base.index(stop)],
               f"chat stop {stop!r}: {got!r} (without stop: {base!r})", r)
        expect(r.choices[0].finish_reason == "stop", "chat stop finish_reason", r)


@check
def seed_reproducible():
    kw = dict(model=MODEL, prompt=STORY_PROMPT, max_tokens=16, temperature=1.0)
    a = client().completions.create(**kw, seed=1234)
    b = client().completions.create(**kw, seed=1234)
    expect(a.choices[0].text == b.choices[0].text,
           f"seed 1234 twice gave {a.choices[0].text!r} and {b.choices[0].text!r}")
    c = client().completions.create(**kw, seed=4321)
    if c.choices[0].text == a.choices[0].text:
        print("    note: seeds 1234 and 4321 gave the same text (allowed, but unusual)")
    # The other tenant, same seed: same text (the seed, not the caller, determines it).
    d = client("beta").completions.create(**kw, seed=1234)
    expect(d.choices[0].text == a.choices[0].text,
           f"seed 1234 from tenant beta gave {d.choices[0].text!r}, alpha {a.choices[0].text!r}")
    e = client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                         temperature=1.0, seed=99)
    f = client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                         temperature=1.0, seed=99)
    expect(e.choices[0].message.content == f.choices[0].message.content,
           "chat: seed 99 twice gave different texts")


@check
def prompt_forms():
    """A list of prompts is a batch; token-id prompts are accepted."""
    r = client().completions.create(model=MODEL, prompt=["Hello", "The sky is"], max_tokens=4,
                                    temperature=0)
    expect(sorted(c.index for c in r.choices) == [0, 1],
           f"two prompts gave choice indices {[c.index for c in r.choices]}", r)
    single = client().completions.create(model=MODEL, prompt="The sky is", max_tokens=4,
                                         temperature=0)
    by_index = {c.index: c.text for c in r.choices}
    expect(by_index[1] == single.choices[0].text,
           f"prompt list [.., 'The sky is'] choice 1 {by_index[1]!r} != single "
           f"{single.choices[0].text!r}", r)
    # Token ids of the same prompt (from echo logprobs would need a tokenizer; use /tokenize-free
    # arbitrary ids instead: ids below 1000 exist in every vocabulary we serve).
    r = client().completions.create(model=MODEL, prompt=[504, 3821, 314], max_tokens=4,
                                    temperature=0)
    expect(len(r.choices) == 1 and r.usage.prompt_tokens == 3,
           f"token-id prompt: prompt_tokens {r.usage.prompt_tokens}, expected 3", r)
    r = client().completions.create(model=MODEL, prompt=[[504, 3821], [314]], max_tokens=2,
                                    temperature=0)
    expect(sorted(c.index for c in r.choices) == [0, 1], "list of token-id lists", r)


@check
def error_400_bad_request():
    expect_error(openai.BadRequestError, 400, lambda: client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=-1), param="temperature")
    still_serving()
    expect_error(openai.BadRequestError, 400, lambda: client().chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, n=0), param="n")
    still_serving()
    expect_error(openai.BadRequestError, 400, lambda: client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=21), param="logprobs")
    still_serving()
    # Structured output and tool calls, which this server does not do, are refused.
    expect_error(openai.BadRequestError, 400, lambda: client().chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, response_format={"type": "json_object"}),
        param="response_format")
    expect_error(openai.BadRequestError, 400, lambda: client().chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, tools=[{"type": "function", "function": {
            "name": "now", "parameters": {"type": "object", "properties": {}}}}]),
        param="tools")
    still_serving()
    # A streaming request that is invalid is refused before any event is sent.
    expect_error(openai.BadRequestError, 400, lambda: list(client().chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=-1, stream=True)))
    still_serving()


@check
def error_401_wrong_key():
    expect_error(openai.AuthenticationError, 401, lambda: client(key=WRONG_KEY).completions
                 .create(model=MODEL, prompt=PROMPT, max_tokens=2))
    still_serving()
    expect_error(openai.AuthenticationError, 401, lambda: client(key=WRONG_KEY).models.list())
    still_serving("beta")


@check
def error_404_unknown_model():
    expect_error(openai.NotFoundError, 404, lambda: client().completions.create(
        model="no-such-model", prompt=PROMPT, max_tokens=2))
    still_serving()


@check
def cached_tokens_same_tenant():
    prompt = f"Note {uuid.uuid4().hex[:8]}. {PARAGRAPH}"
    first = client("alpha").completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                               temperature=0)
    expect(first.usage.prompt_tokens >= 64,
           f"prompt is only {first.usage.prompt_tokens} tokens", first)
    expect(first.usage.prompt_tokens_details.cached_tokens == 0,
           "first request of a fresh prompt has cached_tokens > 0", first)
    second = client("alpha").completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                                temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    expect(cached > 0, "same prompt sent twice by the same tenant: cached_tokens == 0", second)
    expect(cached < second.usage.prompt_tokens,
           f"cached_tokens {cached} >= prompt_tokens (the last one must be computed)", second)
    print(f"    cached_tokens {cached} of {second.usage.prompt_tokens} prompt tokens")


@check
def cached_tokens_isolated_between_tenants():
    prompt = f"Memo {uuid.uuid4().hex[:8]}. {PARAGRAPH}"
    a = client("alpha").completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                           temperature=0)
    a2 = client("alpha").completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                            temperature=0)
    expect(a2.usage.prompt_tokens_details.cached_tokens > 0, "alpha's own repeat was not cached",
           a2)
    b = client("beta").completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                          temperature=0)
    expect(b.usage.prompt_tokens_details.cached_tokens == 0,
           "tenant beta got cached_tokens > 0 for a prompt only alpha had sent", b)
    b2 = client("beta").completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                           temperature=0)
    expect(b2.usage.prompt_tokens_details.cached_tokens > 0,
           "beta's own repeat was not cached", b2)
    expect(a.choices[0].text == b.choices[0].text, "alpha and beta got different greedy text")
    # Chat reports it too.
    msgs = [{"role": "system", "content": PARAGRAPH}, {"role": "user", "content": "Summarize."}]
    client("alpha").chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    c = client("alpha").chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    expect(c.usage.prompt_tokens_details.cached_tokens > 0, "chat repeat was not cached", c)


# ---------------------------------------------------------------------------------------------


def main() -> int:
    global ADDR
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", help="run only checks whose name contains this")
    ap.add_argument("-v", action="store_true", help="print the server's stderr at the end")
    args = ap.parse_args()
    print(f"openai {openai.__version__}, model {MODEL}", flush=True)

    server = None
    tmp = tempfile.TemporaryDirectory(prefix="kvserve-conformance-")
    if os.environ.get("KVSERVE_ADDR"):
        ADDR = os.environ["KVSERVE_ADDR"]
    else:
        if missing_inputs():
            return 2
        tenants = Path(tmp.name) / "tenants.toml"
        write_tenants(tenants)
        server = Server(tenants, Path(tmp.name))
        ADDR = server.addr

    results: list[tuple[str, bool, float, str]] = []
    t_all = time.monotonic()
    for fn in CHECKS:
        if args.k and args.k not in fn.__name__:
            continue
        print(f"-- {fn.__name__}", flush=True)
        t0 = time.monotonic()
        try:
            fn()
            ok, msg = True, ""
        except AssertionError as e:
            ok, msg = False, str(e)
        except openai.APIStatusError as e:
            ok, msg = False, (f"{type(e).__name__} {e.status_code} "
                              f"{e.request.method} {e.request.url}: {e.response.text}")
        except Exception as e:  # noqa: BLE001 - report any failure and go on
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            ok, msg = False, "".join(tb).rstrip()
        dt = time.monotonic() - t0
        results.append((fn.__name__, ok, dt, msg))
        print(f"   {'PASS' if ok else 'FAIL'} ({dt:.1f} s)" + (f"\n    {msg}" if msg else ""),
              flush=True)
        if server is not None and not server.alive():
            results.append(("server_alive", False, 0.0,
                            f"server died with code {server.proc.returncode}"))
            print(f"FATAL: server died with code {server.proc.returncode}; stderr:\n"
                  f"{server.stderr_text()}", file=sys.stderr)
            break

    if server is not None and server.alive():
        print("-- shutdown (SIGTERM)", flush=True)
        t0 = time.monotonic()
        code = server.terminate()
        ok = code == 0
        msg = "" if ok else (f"did not exit within {STOP_TIMEOUT_S} s" if code is None
                             else f"exit code {code} after SIGTERM, expected 0")
        results.append(("sigterm_exit_0", ok, time.monotonic() - t0, msg))
        print(f"   {'PASS' if ok else 'FAIL'}" + (f"\n    {msg}" if msg else ""), flush=True)

    failed = [r for r in results if not r[1]]
    if server is not None and (failed or args.v):
        print("---- server stderr ----")
        print(server.stderr_text()[-20000:])
    print()
    print(f"==== openai conformance: {len(results) - len(failed)} passed, {len(failed)} failed "
          f"({time.monotonic() - t_all:.0f} s)")
    for name, ok, dt, msg in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}" + ("" if ok else f": {msg.splitlines()[0]}"))
    if server is not None:
        server.kill()
    tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
