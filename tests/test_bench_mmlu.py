"""MMLU evaluator on the hand-made fixtures in both CSV layouts (tests/fixtures/mmlu_*)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_mmlu

from benchmarks import mmlu
from benchmarks.common import ModelArgs, load
from data_preprocess.hub import ArgumentError

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(ModelArgs(model=str(tiny_model_dir), device="cpu", dtype="fp32"))


def test_both_layouts_read_identically():
    for subj in ("astronomy", "world_religions"):
        for split in ("dev", "test"):
            a = mmlu.read_csv(FIX / "mmlu_original" / split / f"{subj}_{split}.csv", subj)
            b = mmlu.read_csv(FIX / "mmlu_header" / split / f"{subj}_{split}.csv", subj)
            assert a == b and len(a) >= 2
    q = mmlu.read_csv(FIX / "mmlu_header" / "test" / "astronomy_test.csv", "astronomy")[2]
    assert q.answer == 3 and q.choices[3] == "Gravity"


def test_prompt_format():
    dev = mmlu.read_csv(FIX / "mmlu_original" / "dev" / "astronomy_dev.csv", "astronomy")
    q = mmlu.read_csv(FIX / "mmlu_original" / "test" / "astronomy_test.csv", "astronomy")[0]
    p = mmlu.build_prompt(q, dev[:1])
    assert p == ("The following are multiple choice questions (with answers) about astronomy.\n\n"
                 "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B\n\n"
                 "Which is the largest planet of the Solar System?\nA. Jupiter\nB. Neptune\nC. Earth\nD. Uranus\n"
                 "Answer:")


def test_categories_cover_57_subjects():
    assert len(mmlu.SUBCATEGORY) == 57
    assert {mmlu.category(s) for s in mmlu.SUBCATEGORY} == {"STEM", "humanities", "social sciences", "other"}
    assert mmlu.category("astronomy") == "STEM" and mmlu.category("world_religions") == "humanities"


def test_bad_csv_names_file_and_line(tmp_path):
    (tmp_path / "test").mkdir()
    f = tmp_path / "test" / "x_test.csv"
    f.write_text("q1,a,b,c,d,A\nq2,a,b,c,d,E\n")
    with pytest.raises(ValueError, match=r"x_test.csv:2: answer must be a letter"):
        mmlu.read_csv(f, "x")
    # through the CLI path: the same line as a clean exit, not a traceback, before any model is loaded
    cfg = mmlu.MMLUConfig(model="never-loaded", data_dir=str(tmp_path), shots=0)
    with pytest.raises(ArgumentError, match=r"^.*x_test.csv:2: answer must be a letter A-D in the headerless layout, got 'E'$"):
        mmlu.run(cfg)
    cfg.shots = 1  # no dev/ dir: a missing file is named too
    with pytest.raises(ArgumentError, match=r"dev/x_dev.csv: no such file; an MMLU dir holds dev/"):
        mmlu.run(cfg)


def test_run_matches_independent_argmax_and_layouts_agree(tiny_model_dir, tmp_path, loaded):
    results = {}
    for layout in ("mmlu_original", "mmlu_header"):
        cfg = mmlu.MMLUConfig(model=str(tiny_model_dir), data_dir=str(FIX / layout), shots=5, batch_size=3,
                              output=str(tmp_path / f"{layout}.json"), device="cpu")
        results[layout] = mmlu.run(cfg, loaded)
    a, b = results.values()
    assert a["accuracy_micro"] == b["accuracy_micro"] and a["n_questions"] == 5 and a["n_subjects"] == 2
    assert set(a["categories"]) == {"STEM", "humanities"}
    recs = [json.loads(ln) for ln in Path(a["per_question"]).read_text().splitlines()]
    tok, model = loaded.tokenizer, loaded.model
    for rec in recs[:3]:
        dev = mmlu.read_csv(FIX / "mmlu_original" / "dev" / f"{rec['subject']}_dev.csv", rec["subject"])
        q = mmlu.read_csv(FIX / "mmlu_original" / "test" / f"{rec['subject']}_test.csv", rec["subject"])[rec["index"]]
        prompt = mmlu.build_prompt(q, dev)
        ctx = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        lps = []
        for letter in "ABCD":
            full = [tok.bos_token_id] + tok.encode(prompt + " " + letter, add_special_tokens=False)
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([full])).logits[0], -1)
            lps.append(float(sum(lp[i - 1, full[i]] for i in range(len(ctx), len(full)))))
        assert rec["pred"] == "ABCD"[max(range(4), key=lambda j: lps[j])]
        assert rec["logprobs"] == pytest.approx(lps, abs=1e-4)
    micro = sum(r["correct"] for r in recs) / len(recs)
    assert a["accuracy_micro"] == pytest.approx(micro)


def test_cli_smoke(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert mmlu.main(["--model", str(tiny_model_dir), "--data_dir", str(FIX / "mmlu_header"), "--shots", "2",
                      "--limit", "1", "--device", "cpu", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| all (micro) | 2 |" in printed
    assert json.loads(out.read_text())["shots"] == 2


def test_cloze_formulation_matches_direct_computation(tiny_model_dir, tmp_path, loaded):
    data = tmp_path / "mmlu"
    write_tiny_mmlu(data)
    base = {"model": str(tiny_model_dir), "data_dir": str(data), "shots": 2, "batch_size": 4, "device": "cpu"}
    both = mmlu.run(mmlu.MMLUConfig(**base, formulation="both", output=str(tmp_path / "both.json")), loaded)
    letter = mmlu.run(mmlu.MMLUConfig(**base, output=str(tmp_path / "letter.json")), loaded)
    # adding the cloze formulation leaves the letter results as they were
    for k in ("accuracy_micro", "accuracy_macro", "categories", "subjects", "n_questions"):
        assert both[k] == letter[k]
    assert letter["formulations"] == ["letter"] and "cloze" not in letter
    recs = [json.loads(ln) for ln in Path(both["per_question"]).read_text().splitlines()]
    tok, model = loaded.tokenizer, loaded.model
    dev = mmlu.read_csv(data / "dev" / "world_religions_dev.csv", "world_religions")
    test = mmlu.read_csv(data / "test" / "world_religions_test.csv", "world_religions")
    for q in test:
        rec = next(r for r in recs if r["subject"] == q.subject and r["index"] == q.index)
        prompt = mmlu.build_cloze_prompt(q, dev[:2])
        assert prompt.startswith("The following are questions (with answers) about world religions.\n\n"
                                 "Question: Where is Mecca?\nAnswer: Saudi Arabia\n\n")
        assert prompt.endswith(f"Question: {q.question}\nAnswer:")
        ctx = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        lps = []
        for choice in q.choices:
            full = [tok.bos_token_id] + tok.encode(prompt + " " + choice, add_special_tokens=False)
            assert full[:len(ctx)] == ctx  # this tokenizer does not merge across "Answer:" and the space
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([full])).logits[0], -1)
            lps.append(float(sum(lp[i - 1, full[i]] for i in range(len(ctx), len(full)))))
        assert rec["cloze_logprobs"] == pytest.approx(lps, abs=1e-4)
        assert rec["cloze_pred"] == "ABCD"[max(range(4), key=lambda j: lps[j])]
        norm = [lp / len(c.encode()) for lp, c in zip(lps, q.choices)]
        assert rec["cloze_pred_norm"] == "ABCD"[max(range(4), key=lambda j: norm[j])]
    cz = both["cloze"]
    assert cz["accuracy_micro"] == pytest.approx(sum(r["cloze_pred"] == r["answer"] for r in recs) / 6)
    assert cz["acc_norm_micro"] == pytest.approx(sum(r["cloze_pred_norm"] == r["answer"] for r in recs) / 6)
    assert "cloze acc_norm" in mmlu.report(both)
    only = mmlu.run(mmlu.MMLUConfig(**base, formulation="cloze", output=str(tmp_path / "c.json")), loaded)
    assert only["accuracy_micro"] == cz["accuracy_micro"] and only["cloze"]["acc_norm_micro"] == cz["acc_norm_micro"]
