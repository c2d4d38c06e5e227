"""Issue 18, the CLIs used carelessly or fed hostile files: predict, preprocess and merge never overwrite or
delete an input, never apply an adapter twice, and answer a bad file with one `error:` line (exit 2) before
any model is loaded -- no traceback. The real CLIs' main() (in-process: one import of torch), real tokenizer /
tiny model / LoRA adapter."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_merge import lora_run  # noqa: F401 - the fixture: a real tiny LoRA fine-tune

from data_preprocess.hub import ArgumentError

REPO = Path(__file__).resolve().parents[1]
TUNE = "X:1\nT:One\nM:4/4\nL:1/8\nK:G\nGABc dedB|dBAG E2D2|]\n"


@pytest.fixture
def cli(capsys):
    """cli("inference.predict", *args) -> (returncode, stderr) of that module's main()."""
    import importlib

    def run(module: str, *args):
        main = importlib.import_module(module).main
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        return SimpleNamespace(returncode=rc, stderr=capsys.readouterr().err)
    return run


def _one_error_line(p: SimpleNamespace, *words: str):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr and lines[-1].startswith("error: "), p.stderr[-2000:]
    for w in words:
        assert w in lines[-1], (w, lines[-1])


def test_predict_bad_data_and_output_files_refused_before_loading(cli, tmp_path, tiny_model_dir):
    data = tmp_path / "same.json"
    data.write_text('["write a jig"]')
    model = tiny_model_dir   # resolved, never loaded: the files are checked first
    cases = {
        "binary": (tmp_path / "b.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text"),
        "utf16": (tmp_path / "u.jsonl", '{"instruction": "hi"}\n'.encode("utf-16"), "UTF-16"),
        "nul": (tmp_path / "n.txt", b"hello\x00world\n", "NUL bytes"),
    }
    for path, raw, words in cases.values():
        path.write_bytes(raw)
        _one_error_line(cli("inference.predict", "--model", tiny_model_dir, "--data_file", path,
                             "--predictions_file", tmp_path / "o.json"), str(path), words)
    _one_error_line(cli("inference.predict", "--model", model, "--data_file", data, "--predictions_file",
                         tmp_path / "." / "same.json"), "is the --data_file", "overwritten")
    assert data.read_text() == '["write a jig"]'
    _one_error_line(cli("inference.predict", "--model", model, "--data_file", data, "--predictions_file", tmp_path),
                    "is a directory")
    _one_error_line(cli("inference.predict", "--model", model, "--data_file", data, "--predictions_file",
                         data / "out.json"), "cannot be written")


def test_predict_broken_model_dirs_and_uncached_hub_ids_are_one_line(cli, tmp_path, tiny_model_dir, monkeypatch):
    data = tmp_path / "p.txt"
    data.write_text("write a jig\n")
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    shutil.copy(tiny_model_dir / "config.json", cfg_only)
    bad_cfg = tmp_path / "bad_cfg"
    shutil.copytree(tiny_model_dir, bad_cfg)
    (bad_cfg / "config.json").write_text('{"model_type": "llama", ')
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    st = truncated / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    for d in (cfg_only, bad_cfg, truncated):
        _one_error_line(cli("inference.predict", "--model", d, "--data_file", data, "--predictions_file",
                             tmp_path / "o.json"), f"model {d}: cannot be loaded", "Fix:")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)   # online as far as the environment says
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    p = cli("inference.predict", "--model", "someone/never-downloaded", "--data_file", data)
    _one_error_line(p, "someone/never-downloaded", "not downloaded", "tunesmith never downloads")


def test_preprocess_never_deletes_its_tokenizer_or_inputs(cli, tmp_path, tokenizer_dir):
    prev = tmp_path / "prev"
    shutil.copytree(tokenizer_dir, prev / "tokenizer")
    before = {f.name: f.read_bytes() for f in (prev / "tokenizer").iterdir()}
    abc = tmp_path / "a.abc"
    abc.write_text(TUNE)
    p = cli("data_preprocess.preprocess", "-t", prev / "tokenizer", "-i", abc, "-o", prev, "--no_progress")
    _one_error_line(p, f"-o/--output_dir {prev} contains -t/--tokenizer {prev / 'tokenizer'}")
    assert {f.name: f.read_bytes() for f in (prev / "tokenizer").iterdir()} == before
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.abc").write_text(TUNE)
    _one_error_line(cli("data_preprocess.preprocess", "-t", tokenizer_dir, "-i", corpus / "a.abc", "-o", corpus,
                         "--no_progress"), "contains -i/--input")
    assert (corpus / "a.abc").read_text() == TUNE


def test_preprocess_huge_jsonl_record_is_rejected_unread_and_unreadable_input_is_one_line(cli, tmp_path,
                                                                                          tokenizer_dir):
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        f.write(json.dumps({"text": TUNE}) + "\n")
        f.write(json.dumps({"text": "X:2\nT:huge\nK:C\n" + "CDEF|\n" * 10_000_000}) + "\n")   # 60 MB of short lines
        f.write(json.dumps({"text": TUNE.replace("X:1", "X:3").replace("GABc", "ABcd")}) + "\n")
    out = tmp_path / "out"
    code = ("import resource, sys\nfrom data_preprocess.preprocess import main\n"
            f"rc = main(['-t', {str(tokenizer_dir)!r}, '-i', {str(big)!r}, '-o', {str(out)!r}, '--no_progress'])\n"
            "print('peak_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\nsys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    peak = int(p.stdout.split("peak_mb")[-1])
    rejects = [json.loads(ln) for ln in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"].rsplit(":", 1)[-1], r["reason"]) for r in rejects] == [("2", "line_too_long")]
    assert json.loads((out / "meta.json").read_text())["counts"]["split_sizes"]["train"] >= 1
    # the record is never held: 279 MB on an idle machine, 1,051 MB once under heavy load (main d929755: 9.4 GB)
    assert peak < 2000, peak

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "ok.abc").write_text(TUNE)
    (corpus / "unreadable.abc").symlink_to("/proc/self/mem")     # a file whose read fails (EIO); root reads mode 000
    _one_error_line(cli("data_preprocess.preprocess", "-t", tokenizer_dir, "-i", corpus, "-o", tmp_path / "o2",
                         "--no_progress"), f"input {corpus / 'unreadable.abc'}: cannot be read")


def test_merge_refuses_a_base_that_already_holds_the_adapter_and_a_foreign_base(cli, lora_run, tmp_path):  # noqa: F811
    merged = tmp_path / "merged"
    assert cli("training.merge", "--base_model", lora_run["base"], "--lora_model", lora_run["adapter"],
                "--output_dir", merged).returncode == 0
    info = json.loads((merged / "merge_info.json").read_text())
    assert len(info["adapter_sha256"]) == 64 and [a["sha256"] for a in info["adapters"]] == [info["adapter_sha256"]]
    copy = tmp_path / "adapter_copy"          # the same adapter copied elsewhere is still the same adapter
    shutil.copytree(lora_run["adapter"], copy)
    p = cli("training.merge", "--base_model", merged, "--lora_model", copy, "--output_dir", tmp_path / "twice")
    _one_error_line(p, f"base {merged} already holds adapter {copy}", "twice")
    assert not (tmp_path / "twice").exists()

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(lora_run["adapter"])
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tok))).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    p = cli("training.merge", "--base_model", gpt2, "--lora_model", lora_run["adapter"], "--output_dir",
             tmp_path / "foreign")
    _one_error_line(p, f"adapter {lora_run['adapter']} does not fit base {gpt2} (gpt2", "Fix:")
    truncated = tmp_path / "truncated_base"
    shutil.copytree(lora_run["base"], truncated)
    st = truncated / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    p = cli("training.merge", "--base_model", truncated, "--lora_model", lora_run["adapter"], "--output_dir",
            tmp_path / "from_truncated")
    _one_error_line(p, f"model {truncated}: cannot be loaded", "Fix:")


def test_benchmark_clis_refuse_bad_input_in_one_line_before_any_model_loads(cli, tmp_path):
    """Each evaluator names the file and the fix in one line, before a model is loaded or a tune generated
    (a bad prompts file used to surface only after the unconditional half had been generated)."""
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a jig in D"}\nnot json\n')
    missing = tmp_path / "no_such_model"
    cases = [
        (("benchmarks.abc_quality", "--model", missing, "--prompts", bad), f"{bad}:2: not valid JSON"),
        (("benchmarks.abc_quality", "--model", missing, "--n", 2), "no such directory"),
        (("benchmarks.abc_quality", "--abc_file", tmp_path / "none.abc"), "no such file or directory"),
        (("benchmarks.bits_per_char", "--model", missing, "--data", bad), "no such directory"),
        (("benchmarks.mmlu", "--model", missing, "--data_dir", tmp_path), "no test/ directory"),
        (("benchmarks.generate_speed", "--model", missing), "no such directory"),
    ]
    for args, words in cases:
        p = cli(*args)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode not in (0, None) and "Traceback" not in p.stderr, (args, p.stderr[-2000:])
        assert lines and words in lines[-1], (args, words, p.stderr[-2000:])
    from benchmarks.bits_per_char import read_documents

    with pytest.raises(ArgumentError, match="takes ABC text"):
        read_documents(str(bad))
