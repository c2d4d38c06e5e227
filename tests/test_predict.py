"""inference/predict.py and inference/generation.py on tiny models: batch JSON output, terminal chat through
stdin (history used, /reset), streaming pieces in order, left-padded batches equal single prompts, EOS stop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_predict_fixtures import PROMPT, REPLY, TUNE, memorised_model

from data_preprocess.hub import ArgumentError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is far faster than two fighting for cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def memo_dir(tiny_model_dir, tmp_path_factory):
    return memorised_model(tiny_model_dir, tmp_path_factory.mktemp("memorised"))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from inference.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="fp32")


def _run(args: list[str], stdin: str | None = None, module: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "inference.predict"] if module else [sys.executable, str(REPO / "inference" / "predict.py")]
    # script mode runs from another cwd with no PYTHONPATH: the script must make the repo importable itself
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"} if not module else {**ENV, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd + args, check=False, input=stdin, capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(REPO) if module else "/")


def test_batch_mode_writes_predictions_json(memo_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    rows = [{"instruction": PROMPT, "id": "a"}, {"instruction": "Compose a reel.", "id": "b"},
            {"prompt": "A waltz, please.", "id": "c"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "out" / "pred.json"
    render = tmp_path / "render"
    p = _run(["--base_model", str(memo_dir), "--data_file", str(data), "--predictions_file", str(out),
              "--with_prompt", "--batch_size", "2", "--max_new_tokens", "80", "--seed", "0", "--render", str(render),
              "--no_wav"])
    assert p.returncode == 0, p.stderr[-3000:]
    preds = json.loads(out.read_text())
    assert [r["input"] for r in preds] == [PROMPT, "Compose a reel.", "A waltz, please."]
    assert [r["record"]["id"] for r in preds] == ["a", "b", "c"] and [r["line"] for r in preds] == [1, 2, 3]
    for r in preds:
        assert set(r) >= {"input", "output", "abc", "prompt_tokens", "new_tokens", "stopped_at_eos", "render"}
        assert 1 <= r["new_tokens"] <= 80
    # the memorised prompt (in a left-padded batch of 2) gives the tune, stops at EOS, and is rendered
    first = preds[0]
    assert first["output"] == REPLY and first["stopped_at_eos"] and first["abc"] == [TUNE]
    rec = first["render"]["tunes"][0]
    assert rec["ok"] and Path(rec["midi"]).stat().st_size > 0 and "<svg" in Path(rec["svg"]).read_text()
    assert "wrote 3 predictions" in p.stderr


def test_batch_mode_bad_line_is_one_clear_error(tiny_model_dir, tmp_path):
    from inference.predict import read_instructions

    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "ok"}\n{"instruction": "broken"\n')
    with pytest.raises(ArgumentError, match=r"bad.jsonl:2: invalid JSON"):
        read_instructions(str(f))
    f.write_text('{"question": "no instruction field"}\n')
    with pytest.raises(ArgumentError, match=r"bad.jsonl:1: record has no string field"):
        read_instructions(str(f))
    t = tmp_path / "plain.txt"
    t.write_text("first\n\nsecond with a\\nnewline\n")
    assert [(r["input"], r["line"]) for r in read_instructions(str(t))] == [("first", 1), ("second with a\nnewline", 3)]


def test_interactive_chat_keeps_history_and_resets(memo_dir, tmp_path):
    log = tmp_path / "chat.jsonl"
    stdin = f"{PROMPT}\nAnd another one?\n/reset\n{PROMPT}\n\nnever read\n"
    p = _run(["--base_model", str(memo_dir), "--interactive", "--with_prompt", "--max_new_tokens", "40",
              "--seed", "0", "--chat_log", str(log)], stdin=stdin, module=True)
    assert p.returncode == 0, p.stderr[-3000:]
    turns = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(turns) == 3  # the empty line ended the chat before "never read"
    t1, t2, t3 = turns
    # turn 2's prompt is the whole conversation so far, in the chat template
    assert t2["prompt"].startswith(t1["prompt"] + t1["output"]) and "And another one?" in t2["prompt"]
    assert t2["prompt_tokens"] > t1["prompt_tokens"] + t1["new_tokens"] - 5
    # /reset: turn 3 starts from scratch, so it is turn 1 again (same seed, same prompt)
    assert t3["prompt"] == t1["prompt"] and t3["prompt_tokens"] == t1["prompt_tokens"] and t3["output"] == t1["output"]
    assert t1["output"].startswith("Here it is:\nX:1")  # the memorised reply (sampled at temperature 0.2)
    # streamed to the terminal, and the session messages are there
    assert p.stdout.count("Assistant: ") == 3 and "(history cleared)" in p.stdout and p.stdout.rstrip().endswith("bye")
    assert t1["output"] in p.stdout


def test_streaming_callback_sees_tokens_in_order(tiny, memo_dir):
    from data_preprocess.chat_format import ChatFormat
    from inference.generation import SamplingConfig, generate
    from inference.loading import load_model

    # a random model emits byte-fallback tokens too (partial UTF-8): the pieces must still add up exactly
    for seed in range(4):
        pieces = []
        r = generate(tiny.model, tiny.tokenizer, "X:1\nK:C\n", SamplingConfig(temperature=1.0, max_new_tokens=40,
                                                                            seed=seed), on_text=pieces.append)
        assert "".join(pieces) == r["output"] and len(pieces) > 3
    memo = load_model(str(memo_dir), device="cpu", dtype="fp32")
    pieces = []
    prompt = ChatFormat(memo.tokenizer).prompt_ids([{"role": "user", "content": PROMPT}])
    r = generate(memo.model, memo.tokenizer, prompt, SamplingConfig(seed=0), on_text=pieces.append)
    assert "".join(pieces) == r["output"] == REPLY and r["stopped_at_eos"]
    # pieces arrive token by token, in order: every prefix of the stream is a prefix of the reply
    assert len(pieces) >= 10 and all(REPLY.startswith("".join(pieces[:i])) for i in range(len(pieces)))
    assert r["new_tokens"] < 1536  # stopped at EOS, long before max_new_tokens


def test_left_padded_batch_equals_single_prompts(tiny):
    from inference.generation import SamplingConfig, generate, generate_batch

    greedy = SamplingConfig(temperature=0, max_new_tokens=12, repetition_penalty=1.0)
    prompts = ["X:1\nT:A much longer header line here\nM:6/8\nK:G\n", "K:D\n", "Human: hi </s> Assistant: "]
    batch = generate_batch(tiny.model, tiny.tokenizer, prompts, greedy)
    single = [generate(tiny.model, tiny.tokenizer, p, greedy) for p in prompts]
    assert [b["output"] for b in batch] == [s["output"] for s in single]
    assert [b["prompt_tokens"] for b in batch] == [s["prompt_tokens"] for s in single]
    assert tiny.tokenizer.padding_side == "left"
    # a static (preallocated) KV cache decodes the same tokens
    static = SamplingConfig(temperature=0, max_new_tokens=12, repetition_penalty=1.0, cache="static")
    assert static.generate_kwargs(tiny.tokenizer)["cache_implementation"] == "static"
    assert [b["output"] for b in generate_batch(tiny.model, tiny.tokenizer, prompts, static)] == \
        [b["output"] for b in batch]


def test_sampling_config_defaults_and_validation():
    from inference.generation import SamplingConfig

    d = SamplingConfig()
    assert (d.temperature, d.top_k, d.top_p, d.repetition_penalty, d.max_new_tokens) == (0.2, 40, 0.9, 1.1, 1536)

    class Tok:
        eos_token_id, pad_token_id = 2, 3

    kw = d.generate_kwargs(Tok())
    assert kw["do_sample"] and kw["use_cache"] and kw["eos_token_id"] == 2 and kw["pad_token_id"] == 3
    assert not SamplingConfig(temperature=0).generate_kwargs(Tok())["do_sample"]
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="cache"):
        SamplingConfig(cache="paged")
    assert "cache_implementation" not in kw  # dynamic: HF's default cache


def test_seed_makes_sampling_reproducible(tiny):
    from inference.generation import SamplingConfig, generate

    cfg = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=123)
    a = generate(tiny.model, tiny.tokenizer, "K:C\n", cfg)["output"]
    b = generate(tiny.model, tiny.tokenizer, "K:C\n", cfg)["output"]
    c = generate(tiny.model, tiny.tokenizer, "K:C\n", SamplingConfig(temperature=1.0, max_new_tokens=16, seed=7))["output"]
    assert a == b != c


def test_model_paths_are_resolved_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    """Local dir -> local; not a Hub id form -> missing local path; Hub id offline and uncached -> not
    downloaded; a Hub id online is left to transformers. Every refusal is one line naming the argument."""
    from inference.loading import ModelPathError, load_model, resolve_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "default").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model_path(str(tiny_model_dir), "tokenizer") == str(tiny_model_dir)
    missing = {"outputs/nope": "outputs/ is a local dir", "outputs/default/mergd": "more than one '/'",
               "./final": "starts with '.'", str(tmp_path / "nope"): "absolute", "~/nope-xyz": "starts with '~'"}
    for name, why in missing.items():
        with pytest.raises(ModelPathError) as e:
            resolve_model_path(name)
        assert str(e.value) == (f"model {name}: no such directory (and not a Hub id). Fix: pass the directory "
                                "written by training/merge.py or train.py (…/final)"), why
    with pytest.raises(ModelPathError, match=r"^adapter .*: a full model dir, not an adapter dir\. Fix: "):
        resolve_model_path(str(tiny_model_dir), "adapter")
    with pytest.raises(ModelPathError, match=r"^model empty: no config.json in it, not a model dir\. Fix: "):
        resolve_model_path("empty")
    (tmp_path / "run" / "final").mkdir(parents=True)  # a train.py OUTPUT_DIR instead of OUTPUT_DIR/final
    with pytest.raises(ModelPathError, match=r"^adapter run: a training output dir \(its export is run/final\)"):
        resolve_model_path("run", "adapter")
    hub_id = "tunesmith-tests/never-downloaded"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelPathError, match=r"never-downloaded: no such directory, and as a Hub id it is not "
                                             r"downloaded while HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set"):
        resolve_model_path(hub_id)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ModelPathError, match=r"never-downloaded: no such directory, and as a Hub id it is not "
                                             r"downloaded \(tunesmith never downloads models\)"):
        resolve_model_path(hub_id)  # online too: refused up front, never fetched (issue 18)
    # load_model refuses a missing adapter before loading anything
    with pytest.raises(ModelPathError, match=r"^adapter outputs/default/sft/finall: no such directory"):
        load_model(str(tiny_model_dir), "outputs/default/sft/finall", device="cpu")


def test_cli_bad_model_path_is_one_line_exit_2(tiny_model_dir, tmp_path):
    """`predict.py --base_model outputs/default/mergd` used to raise OSError from transformers (a traceback)."""
    (tmp_path / "outputs" / "default" / "sft").mkdir(parents=True)
    cmds = {("--base_model", "outputs/default/mergd", "--interactive"): "model outputs/default/mergd: no such directory",
            ("--base_model", str(tiny_model_dir), "--lora_model", "outputs/default/sft/finall", "--data_file", "p.txt"):
            "adapter outputs/default/sft/finall: no such directory"}
    for args, msg in cmds.items():
        p = subprocess.run([sys.executable, str(REPO / "inference" / "predict.py"), *args], cwd=tmp_path, input="",
                           capture_output=True, text=True, env=ENV, timeout=300, check=False)
        assert p.returncode == 2 and p.stdout == "", p.stderr[-2000:]
        assert p.stderr.startswith(f"error: {msg} (and not a Hub id). Fix: ") and p.stderr.count("\n") == 1, p.stderr
