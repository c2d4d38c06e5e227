"""benchmarks.report end to end on the three kinds of model dirs a user has (a merged HF dir, train.py's
full-model ``…/final``, base + LoRA adapter), and the repository's ``evaluate`` modules loaded offline."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_tiny_mmlu

from benchmarks import abc_metrics as am
from benchmarks import abc_quality, bits_per_char, mmlu, music_theory_bench, report
from benchmarks.common import ModelArgs, load

FIX = Path(__file__).parent / "fixtures"
HELD_OUT = ("X:1\nT:a\nM:6/8\nL:1/8\nK:D\n\"D\"dAF A2B|\"A\"c3 d2e|fed cBA|\"D\"d3 d3|]\n",
            "X:2\nT:b\nM:3/4\nL:1/4\nK:G\nG A B|c2 d|e d c|B3|]\n",
            "X:3\nT:c\nM:4/4\nL:1/8\nK:Am\n|:A2 cA BAGB|A2 cA B2 e2:|\n")

# hand-made tunes for the metric modules: valid, a wrong bar length, a key other than the one asked for
VALID = "X:1\nT:ok\nM:4/4\nL:1/8\nK:G\n|:GABc d2B2|c2A2 G4:|\n"
LONG_BAR = "X:2\nT:long bar\nM:3/4\nL:1/8\nK:D\nD2 F2 A2|d2 c2 B2 A2|d6|]\n"
OTHER_KEY = "X:3\nT:in D\nM:6/8\nL:1/8\nK:D\ndAF A2B|c3 d2e|fed cBA|d3 d3|]\n"


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_evaluate_modules_offline_equal_abc_metrics(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    abc = evaluate.load(str(REPO / "benchmarks" / "metrics" / "abc_quality"))
    keys, meters = ["G", "D", "G"], ["4/4", "3/4", "6/8"]
    r = abc.compute(predictions=[VALID, LONG_BAR, OTHER_KEY], keys=keys, meters=meters, train_tunes=[VALID])
    checks = [am.check_bars(t) for t in (VALID, LONG_BAR, OTHER_KEY)]
    assert [c.consistent for c in checks] == [True, False, True]
    assert r["bar_consistency"] == sum(c.n_match for c in checks) / sum(c.n_bars for c in checks)
    assert r["tunes_all_bars_consistent"] == pytest.approx(2 / 3)
    comp = [am.compliance(t, k, m) for t, k, m in zip((VALID, LONG_BAR, OTHER_KEY), keys, meters)]
    assert [c["key"] for c in comp] == [True, True, False]
    assert r["key_compliance"] == pytest.approx(2 / 3) and r["meter_compliance"] == 1.0
    memo = am.MemorisationIndex([VALID])
    assert r["exact_copy_rate"] == pytest.approx(sum(memo.check(t)["exact"] for t in (VALID, LONG_BAR, OTHER_KEY)) / 3)
    assert r["repetition_rate"] == pytest.approx(1 / 3) and r["n"] == 3
    assert 0 < r["parse_rate"] <= 1  # the real abc2midi ran on each tune

    bpc = evaluate.load(str(REPO / "benchmarks" / "metrics" / "bits_per_char"))
    texts = [VALID, OTHER_KEY]
    f = bpc.compute(predictions=[30.0, 50.5], references=texts, n_tokens=[20, 31])
    assert f == bits_per_char.figures([30.0, 50.5], [len(t) for t in texts], [20, 31], texts)
    assert f["bits_per_char"] == pytest.approx(80.5 / math.log(2) / sum(map(len, texts)))


@pytest.fixture(scope="module")
def three_dirs(tiny_model_dir, tmp_path_factory):
    """merged HF dir, a train.py-style run dir whose final/ is a full model, and base + a LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("report_models")
    final = root / "full_run" / "final"
    shutil.copytree(tiny_model_dir, final)
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))  # a non-zero delta
    adapter = root / "lora_run" / "final"
    lora.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    return {"merged": (str(tiny_model_dir), None), "final": (str(final), None),
            "lora": (str(tiny_model_dir), str(adapter))}


def test_report_end_to_end_equals_each_benchmark(three_dirs, tmp_path):
    data = write_tiny_mmlu(tmp_path / "mmlu")
    held = tmp_path / "heldout.abc"
    held.write_text("\n".join(HELD_OUT))
    out = tmp_path / "report"
    specs = [f"{n}={m}" + (f"+{a}" if a else "") for n, (m, a) in three_dirs.items()]
    cmd = [sys.executable, "-m", "benchmarks.report", "--models", *specs, "--mmlu_dir", str(data),
           "--mmlu_shots", "1", "--mmlu_limit", "2", "--mtb_data", str(FIX / "music_theory_bench.jsonl"),
           "--bpc_data", str(held), "--abc_n", "2", "--abc_max_new_tokens", "24", "--abc_train_corpus", str(held),
           "--device", "cpu", "--batch_size", "4", "--output", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "expect about" in p.stdout and "| metric | merged | final | lora |" in p.stdout
    for f in ("report.md", "report.json", "report.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "report.json").read_text())
    assert res["skipped"] == {} and set(res["models"]) == {"merged", "final", "lora"}
    assert res["environment"]["evaluate"] and res["command"].endswith(str(out))
    md = (out / "report.md").read_text()
    assert "evaluate.load(\"benchmarks/metrics/abc_quality\")" in md

    for name in ("merged", "lora"):  # final/ is a copy of the merged dir: its figures must equal merged's (below)
        model, adapter = three_dirs[name]
        got = res["models"][name]["metrics"]
        loaded = load(ModelArgs(model=model, lora_model=adapter, device="cpu"))
        kw = {"model": model, "lora_model": adapter, "device": "cpu", "batch_size": 4}
        m = mmlu.run(mmlu.MMLUConfig(**kw, data_dir=str(data), shots=1, limit=2, formulation="both",
                                     output=str(tmp_path / name / "m.json")), loaded)
        assert got["mmlu_letter"] == m["accuracy_micro"] and got["mmlu_cloze"] == m["cloze"]["accuracy_micro"]
        assert got["mmlu_cloze_norm"] == m["cloze"]["acc_norm_micro"]
        t = music_theory_bench.run(music_theory_bench.MTBConfig(**kw, data=str(FIX / "music_theory_bench.jsonl"),
                                                                output=str(tmp_path / name / "t.json")), loaded)
        assert got["mtb_overall"] == t["scores"]["sum"]["overall"]["mean"]
        b = bits_per_char.run(bits_per_char.BPCConfig(**kw, data=str(held), output=str(tmp_path / name / "b.json")),
                              loaded)
        assert got["bits_per_char"] == b["bits_per_char"] and got["gzip_bits_per_char"] == b["gzip_bits_per_char"]
        a = abc_quality.run(abc_quality.ABCQualityConfig(**kw, n=2, max_new_tokens=24, music21=False,
                                                         max_length=None, train_corpus=str(held),
                                                         output=str(tmp_path / name / "a.json")), loaded)["summary"]["all"]
        for k in ("parse_rate", "bar_consistency", "key_compliance", "meter_compliance", "exact_copy_rate"):
            assert got.get(f"abc_{k}") == a[k], (name, k)
    # the adapter changed the model: its figures are not the merged dir's (the final/ copy's are)
    assert res["models"]["final"]["metrics"] == res["models"]["merged"]["metrics"]
    assert res["models"]["lora"]["metrics"]["bits_per_char"] != res["models"]["merged"]["metrics"]["bits_per_char"]


def test_model_specs_and_bad_input(tmp_path, tiny_model_dir):
    assert report.parse_models(f"a={tiny_model_dir}\nb=X+Y") == [("a", str(tiny_model_dir), None), ("b", "X", "Y")]
    adapter = tmp_path / "final"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(report.ModelPathError, match=r"is a LoRA adapter dir; give its base model too: x=BASE\+"):
        report.parse_models(f"x={adapter}")
    p = subprocess.run([sys.executable, "-m", "benchmarks.report", "--models", f"x={adapter}", "--no-abc"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: --models") and "Traceback" not in p.stderr
    assert report.join_models_argv(["--models", "a=1", "b=2+3", "--no-abc"]) == ["--models", "a=1\nb=2+3", "--no-abc"]
    # a bad second model stops the report before the first one is evaluated
    cfg = report.ReportConfig(models=f"a={tiny_model_dir}\nb={tiny_model_dir}+{tmp_path / 'missing'}",
                              output=str(tmp_path / "never"))
    with pytest.raises(report.ModelPathError, match=r"^--models b=\.\.\.: adapter .*missing: no such directory"):
        report.run(cfg)
    assert not (tmp_path / "never").exists()
