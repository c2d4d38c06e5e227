"""Shared log-likelihood scorer and the config CLI of the benchmarks (benchmarks/common.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.common import (
    ModelArgs,
    encode_pair,
    encode_pairs,
    load,
    loglikelihood,
    mean_std,
    parse_config,
    score_continuations,
)
from data_preprocess.config import ConfigError


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(ModelArgs(model=str(tiny_model_dir), device="cpu", dtype="fp32"))


def _plain_logprob(model, ids: list[int], n_cont: int) -> float:
    """Independent reference: one unpadded forward pass, sum of the last n_cont token log-probs."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[i - 1, ids[i]] for i in range(len(ids) - n_cont, len(ids))))


def test_encode_pair_splits_at_context_boundary(loaded):
    tok = loaded.tokenizer
    ctx, cont = encode_pair(tok, "X:1\nK:G\n", "abc|", add_bos=True)
    assert ctx[0] == tok.bos_token_id
    assert tok.decode(ctx[1:] + cont) == "X:1\nK:G\nabc|"
    # trailing whitespace of the context moves to the continuation
    ctx2, cont2 = encode_pair(tok, "Answer: ", "B", add_bos=False)
    assert tok.decode(cont2).endswith("B") and tok.decode(ctx2 + cont2) == "Answer: B"
    assert encode_pairs(tok, [("Answer:", " A"), ("Answer:", " B")], add_bos=False)[0][0] == \
        encode_pair(tok, "Answer:", " A", add_bos=False)[0]


def test_batched_scores_equal_plain_forward(loaded):
    """Right-padded, deduplicated, batched scoring == one plain forward pass per request."""
    tok, model = loaded.tokenizer, loaded.model
    pairs = [("X:1\nM:6/8\nK:D\n", "dAF A2B|"), ("X:1\nM:6/8\nK:D\n", "c3 d2e|"), ("Q", " A"), ("Q", " B"),
             ("T:a much longer context line to force padding of the others\nK:C\n", "CDEF|")]
    got = loglikelihood(loaded, pairs, batch_size=2, progress=False)
    for (c, x), s in zip(pairs, got):
        ctx, cont = encode_pair(tok, c, x)
        ref = _plain_logprob(model, ctx + cont, len(cont))
        assert s.n_tokens == len(cont)
        assert s.logprob == pytest.approx(ref, abs=1e-4)


def test_left_truncation_keeps_continuation(loaded):
    ctx = list(range(10, 60))
    cont = [5, 6, 7]
    (s,) = score_continuations(loaded.model, [(ctx, cont)], pad_id=3, max_length=16, progress=False)
    ref = _plain_logprob(loaded.model, (ctx + cont)[-17:], 3)
    assert s.logprob == pytest.approx(ref, abs=1e-4)


def test_mean_std():
    assert mean_std([0.5]) == (0.5, 0.0)
    m, s = mean_std([0.25, 0.75])
    assert m == 0.5 and s == pytest.approx(0.25)


def test_parse_config_precedence(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"model": "from_file", "batch_size": 3, "add_bos": False}))
    cfg = parse_config(ModelArgs, ["--config", str(cfg_file), "--batch_size", "5", "device=cpu"])
    assert (cfg.model, cfg.batch_size, cfg.add_bos, cfg.device) == ("from_file", 5, False, "cpu")
    cfg = parse_config(ModelArgs, ["--model", "m", "--no-add_bos", "max_length=none"])
    assert cfg.add_bos is False and cfg.max_length is None
    assert parse_config(ModelArgs, ["--add_bos", "max_length=7"]).max_length == 7
    assert parse_config(ModelArgs, ["--add_bos", "false"]).add_bos is False
    assert parse_config(ModelArgs, ["--add_bos", "--model", "m"]).add_bos is True
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        parse_config(ModelArgs, ["bogus=1"])
    with pytest.raises(ConfigError, match="batch_size='many'.* Fix: give a value of type int"):
        parse_config(ModelArgs, ["--batch_size", "many"])


def test_default_output_names_keep_runs_apart(tmp_path, monkeypatch):
    from benchmarks.common import default_output

    monkeypatch.chdir(tmp_path)
    for d in ("pt", "sft"):
        (tmp_path / "outputs" / "default" / d / "final").mkdir(parents=True)
    names = {m: default_output("bits_per_char", m).name for m in
             ("outputs/default/pt/final", "outputs/default/sft/final", "outputs/default/merged", "llama-tiny",
              "meta-llama/Llama-2-7b-hf")}
    assert names == {"outputs/default/pt/final": "bits_per_char_pt_final.json",
                     "outputs/default/sft/final": "bits_per_char_sft_final.json",
                     "outputs/default/merged": "bits_per_char_default_merged.json",
                     "llama-tiny": "bits_per_char_llama-tiny.json",
                     "meta-llama/Llama-2-7b-hf": "bits_per_char_meta-llama_Llama-2-7b-hf.json"}
    assert default_output("mmlu", "base", "outputs/default/sft/final", "_5shot").name == "mmlu_sft_final_5shot.json"
    monkeypatch.chdir(tmp_path / "outputs" / "default" / "sft")  # `--model final` from inside the run dir
    assert default_output("bits_per_char", "final").name == "bits_per_char_sft_final.json"


def test_every_benchmark_cli_refuses_a_missing_model_in_one_line(tmp_path, monkeypatch, capsys):
    """`--model outputs/nope` used to be retried against the Hub for ~49 s, then an OSError traceback."""
    from benchmarks import abc_quality, bits_per_char, generate_speed, mmlu
    from benchmarks import music_theory_bench as mtb
    from benchmarks.generate_speed import GenerateSpeedConfig, build_model

    fixtures = Path(__file__).parent / "fixtures"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "t.abc").write_text("X:1\nK:C\nCDEF|\n")
    runs = {mmlu.main: ["--data_dir", str(fixtures / "mmlu_header"), "--shots", "0"],
            mtb.main: ["--data", str(fixtures / "music_theory_bench.jsonl")],
            abc_quality.main: ["--n", "1"], bits_per_char.main: ["--data", "t.abc"], generate_speed.main: []}
    for main, extra in runs.items():
        with pytest.raises(SystemExit) as e:
            main(["--model", "outputs/nope", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2, main.__module__
        assert err == ("error: model outputs/nope: no such directory (and not a Hub id). Fix: pass the directory "
                       "written by training/merge.py or train.py (…/final)\n"), main.__module__
    # presets are not paths: they still build (random init), offline
    model = build_model(GenerateSpeedConfig(model="llama-tiny", vocab_size=64, device="cpu"))[0]
    assert model.config.vocab_size == 64
