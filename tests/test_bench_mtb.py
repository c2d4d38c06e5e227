"""MusicTheoryBench evaluator on the hand-made fixture (tests/fixtures/music_theory_bench.jsonl)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import music_theory_bench as mtb
from benchmarks.common import ModelArgs, load

FIXTURE = Path(__file__).parent / "fixtures" / "music_theory_bench.jsonl"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(ModelArgs(model=str(tiny_model_dir), device="cpu", dtype="fp32"))


def _cfg(tiny_model_dir, tmp_path, **kw):
    base = {"model": str(tiny_model_dir), "data": str(FIXTURE), "device": "cpu", "dtype": "fp32", "batch_size": 4,
                "output": str(tmp_path / "mtb.json")}
    return mtb.MTBConfig(**{**base, **kw})


def test_loads_all_layouts_identically(tmp_path):
    import pandas as pd

    items = mtb.load_items(str(FIXTURE))
    assert {it.split for it in items} == {"dev", "test"} and {it.subject for it in items} == {"knowledge", "reasoning"}
    recs = [json.loads(ln) for ln in FIXTURE.read_text().splitlines()]
    (tmp_path / "list.json").write_text(json.dumps(recs))
    (tmp_path / "by_split.json").write_text(json.dumps({s: [r for r in recs if r["split"] == s] for s in ("dev", "test")}))
    pd.DataFrame(recs).to_parquet(tmp_path / "all.parquet")
    for f in ("list.json", "by_split.json", "all.parquet"):
        other = mtb.load_items(str(tmp_path / f))
        assert sorted((i.id, i.question, i.answer, tuple(i.options.values())) for i in other) == \
            sorted((i.id, i.question, i.answer, tuple(i.options.values())) for i in items), f


def test_abc_score_appended_and_boilerplate_removed():
    items = {it.id: it for it in mtb.load_items(str(FIXTURE))}
    q = items["test-r1"].question
    assert q.startswith("Which note is the highest in this melody?\nX:1\nL:1/4")
    assert "Use the example below" not in q
    assert items["test-k1"].question == items["test-k1"].stem  # no abc_score: stem unchanged
    prompt = mtb.build_prompt(items["test-k1"], [items["dev-k1"]])
    assert prompt == (mtb.DEFAULT_INSTRUCTION + "\nHow many semitones are in a perfect fifth?\nA. 5\nB. 7\nC. 6\n"
                      "D. 8\nAnswer: B\nWhich interval is an inversion of a major third?\nA. Minor sixth\n"
                      "B. Major sixth\nC. Perfect fourth\nD. Minor third\nAnswer:")


def test_bad_record_names_file_line_and_field(tmp_path):
    rec = json.loads(FIXTURE.read_text().splitlines()[0])
    rec["answer"] = "E"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'answer'"):
        mtb.load_items(str(bad))
    del rec["options"]
    bad.write_text("\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'options'"):
        mtb.load_items(str(bad))


def test_cli_bad_record_is_one_line_not_a_traceback(tmp_path):
    recs = [json.loads(ln) for ln in FIXTURE.read_text().splitlines()]
    del recs[3]["answer"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "bad.json").write_text('[{"id": 1},\n oops]')
    for f, msg in ((bad, f"{bad}:4: missing field 'answer' (MusicTheoryBench schema: "),
                   (tmp_path / "bad.json", f"{tmp_path / 'bad.json'}:2: not valid JSON (Expecting value)")):
        p = subprocess.run([sys.executable, "-m", "benchmarks.music_theory_bench", "--model", "never-loaded",
                            "--data", str(f)], cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
        assert p.returncode == 2 and p.stderr.startswith("error: " + msg) and p.stderr.count("\n") == 1, p.stderr[-2000:]


def test_rotation_moves_answer_with_its_option():
    item = mtb.load_items(str(FIXTURE))[5]
    seen = {k: set() for k in mtb.LETTERS}
    for r in range(4):
        rot = mtb.rotate(item, r)
        assert rot.options[rot.answer] == item.options[item.answer]
        assert sorted(rot.options.values()) == sorted(item.options.values())
        for k in mtb.LETTERS:
            seen[k].add(rot.options[k])
    assert all(len(v) == 4 for v in seen.values())  # every option visits every letter
    assert mtb.rotate(item, 1).options["A"] == item.options["B"]
    assert mtb.rotate(item, 1).answer == mtb.LETTERS[(mtb.LETTERS.index(item.answer) - 1) % 4]


@pytest.mark.parametrize("reply,expected", [
    ("B", "B"), (" C.", "C"), ("(D) the plagal cadence", "D"), ("The answer is A.", "A"),
    ("Answer: (C)", "C"), ("I think the correct answer is option B because ...", "B"), ("**D**", "D"),
    ("Option C is right.", "C"), ("answer: b", "B"), ("A or B, hard to say", None), ("I don't know", None),
    ("", None), ("Minor sixth", "A"), ("A major chord has three notes.", None),
])
def test_extract_letter(reply, expected):
    opts = {"A": "Minor sixth", "B": "Major sixth", "C": "Perfect fourth", "D": "Minor third"}
    assert mtb.extract_letter(reply, opts) == expected


def test_ppl_choice_equals_independent_argmax(tiny_model_dir, tmp_path, loaded):
    """The ppl prediction is the argmax of summed log-probs from a plain per-option forward pass."""
    cfg = _cfg(tiny_model_dir, tmp_path, shots=5, permutations=2)
    res = mtb.run(cfg, loaded)
    recs = [json.loads(ln) for ln in Path(res["per_question"]).read_text().splitlines()]
    items = {it.id: it for it in mtb.load_items(str(FIXTURE))}
    shots = [it for it in items.values() if it.split == "dev"][:5]
    tok, model = loaded.tokenizer, loaded.model
    assert len(recs) == 2 * 6
    for rec in recs:
        item = mtb.rotate(items[rec["id"]], rec["rotation"])
        assert rec["answer"] == item.answer and rec["original_answer"] == items[rec["id"]].answer
        prompt = mtb.build_prompt(item, shots)
        ctx = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        lps = []
        for k in mtb.LETTERS:
            full = [tok.bos_token_id] + tok.encode(prompt + f" {k}", add_special_tokens=False)
            assert full[:len(ctx)] == ctx
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([full])).logits[0], -1)
            lps.append(float(sum(lp[i - 1, full[i]] for i in range(len(ctx), len(full)))))
        ref = mtb.LETTERS[max(range(4), key=lambda j: lps[j])]
        assert rec["pred"]["sum"] == ref
        assert rec["logprob"] == pytest.approx(lps, abs=1e-4)
        assert rec["correct"]["sum"] == (ref == item.answer)
    sc = res["scores"]["sum"]
    assert set(sc) == {"knowledge", "reasoning", "overall"} and len(sc["overall"]["per_rotation"]) == 2
    acc = [sum(r["correct"]["sum"] for r in recs if r["rotation"] == k) / 6 for k in range(2)]
    assert sc["overall"]["per_rotation"] == pytest.approx(acc)


def test_gen_mode_lists_unparseable(tiny_model_dir, tmp_path, loaded):
    res = mtb.run(_cfg(tiny_model_dir, tmp_path, mode="gen", max_new_tokens=6, subject="reasoning"), loaded)
    recs = [json.loads(ln) for ln in Path(res["per_question"]).read_text().splitlines()]
    assert len(recs) == 3 and all(r["subject"] == "reasoning" for r in recs)
    for r in recs:
        assert r["pred"]["gen"] == mtb.extract_letter(r["reply"], mtb.rotate(
            next(i for i in mtb.load_items(str(FIXTURE)) if i.id == r["id"]), 0).options)
    assert res["n_unparseable"] == sum(r["pred"]["gen"] is None for r in recs) == len(res["unparseable"])
    assert "gen" in mtb.report(res)


def test_cli_smoke(tiny_model_dir, tmp_path):
    out = tmp_path / "cli.json"
    p = subprocess.run([sys.executable, "-m", "benchmarks.music_theory_bench", "--model", str(tiny_model_dir),
                        "--data", str(FIXTURE), "--mode", "ppl", "--shots", "0", "--permutations", "4",
                        "--device", "cpu", "--output", str(out)], cwd=REPO, capture_output=True, text=True, check=False,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| ppl (sum) |" in p.stdout and "knowledge" in p.stdout
    res = json.loads(out.read_text())
    assert res["permutations"] == 4 and res["n_questions"] == 6
    assert len(res["scores"]["mean_token"]["overall"]["per_rotation"]) == 4
