"""Weighted data mixtures: several shard directories (ABC pretraining shards and plain-text shards, as MusicPile
mixes them) trained as one stream whose order depends on the stream position alone -- so any number of ranks
sees it, and a resume continues it, exactly -- with each source's loss logged.

The data is made the user's way: ``data_preprocess.preprocess`` on music21's ABC and on a JSONL of plain text
(``--content text``), with one tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_train_fixtures import losses, read_json, run_train

from data_preprocess import preprocess
from data_preprocess.shards import open_split, read_meta
from training.config import ConfigError, check_data, load_config
from training.data import ConcatSplit, MixtureStream, step_micro_batches, train_stream
from training.metrics import read_metrics

TEXT = ["The fiddle and the flute played together at the fair, and everyone danced until the lamps went out.",
        "A reel is a dance tune in common time; a jig is in six-eight, with three quavers to each beat.",
        "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.",
        "Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.",
        "The quick brown fox jumps over the lazy dog while the cat watches from the window sill."]


def _preprocess(tok: Path, inp: str, out: Path, *extra: str) -> Path:
    rc = preprocess.main(["-t", str(tok), "-i", inp, "-o", str(out), "--max_len", "64", "--val_ratio", "0.1",
                          "--no_progress", *extra])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def mix(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("mixture")
    jsonl = root / "text.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"{t} ({i})"}) + "\n" for i in range(12) for t in TEXT))
    abc = _preprocess(tokenizer_dir, "music21", root / "abc", "--limit", "80")
    text = _preprocess(tokenizer_dir, str(jsonl), root / "text", "--content", "text")
    return abc, text, root


def test_text_content_keeps_each_document_whole_and_unchanged(mix, tokenizer_dir):
    """``--content text``: every JSONL record is one document, its text as written (no ABC checks: none is
    rejected for having no K:), BOS ... EOS, deduplicated by its text."""
    from transformers import AutoTokenizer

    _, text, _ = mix
    meta = read_meta(text)
    assert meta["content"] == "text" and meta["counts"]["kept"] == 60 and meta["counts"]["rejected_total"] == 0
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = []
    for split in ("train", "val"):
        s = open_split(text, split, meta)
        ids = [int(t) for t, m in zip(np.asarray(s.tokens).ravel(), np.asarray(s.loss_mask).ravel()) if m]
        docs += tok.decode(ids, skip_special_tokens=False).split(tok.eos_token)
    got = {d.replace(tok.bos_token, "").strip() for d in docs if d.strip()}
    assert got == {f"{t} ({i})" for i in range(12) for t in TEXT}


def test_text_content_reads_datasets_rows_and_text_files(tmp_path, tokenizer_dir, capsys):
    """A ``save_to_disk`` dir gives one document per row; a dir of .txt/.md files one per file (a JSONL in it, one
    per record); a music21 request under ``--content text`` is refused in one line."""
    import datasets

    datasets.Dataset.from_dict({"text": TEXT}).save_to_disk(str(tmp_path / "ds"))
    assert read_meta(_preprocess(tokenizer_dir, str(tmp_path / "ds"), tmp_path / "o1", "--content", "text"))[
        "counts"]["kept"] == len(TEXT)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, t in enumerate(TEXT[:3]):
        (docs / f"{i}.md").write_text(f"# Note {i}\n\n{t}\n")
    (docs / "more.jsonl").write_text(json.dumps({"text": TEXT[3]}) + "\n" + json.dumps({"text": TEXT[4]}) + "\n")
    assert read_meta(_preprocess(tokenizer_dir, str(docs), tmp_path / "o2", "--content", "text"))[
        "counts"]["kept"] == 5
    with pytest.raises(SystemExit) as e:
        preprocess.main(["-t", str(tokenizer_dir), "-o", str(tmp_path / "o3"), "--content", "text"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "music21 is an ABC corpus" in err[-1] and "Fix:" in err[-1]


def test_a_mixture_draws_each_source_its_share_and_its_order_is_a_function_of_position():
    """The stream of a 0.8 / 0.2 / 0 mixture: shares within 1 % over 40k items, the zero-weight source never
    drawn, each source walking its own epochs (its first n items are a permutation of its n blocks), and any
    slice read from a fresh stream (a resume) equal to the same slice of one long read."""
    sizes = [500, 300, 50]
    st = MixtureStream(sizes, [0.8, 0.2, 0.0], seed=3)
    items = st.take(0, 40_000)
    src = np.searchsorted(st.offsets, items, side="right") - 1
    share = np.bincount(src, minlength=3) / len(items)
    assert abs(share[0] - 0.8) < 0.01 and abs(share[1] - 0.2) < 0.01 and share[2] == 0
    first = items[src == 1][:300] - 500
    assert sorted(first.tolist()) == list(range(300))
    for start in (0, 4095, 4096, 12_345, 39_000):
        assert np.array_equal(MixtureStream(sizes, [0.8, 0.2, 0.0], seed=3).take(start, 1000)[:1000],
                              items[start:start + 1000])
    assert not np.array_equal(MixtureStream(sizes, [0.8, 0.2, 0.0], seed=4).take(0, 100), items[:100])
    # any world size reads the same global batch: the ranks' micro-batches together are the step's slice
    one = np.concatenate(step_micro_batches(st, 800, 16, 4, 0, 1))
    two = [np.concatenate(step_micro_batches(st, 800, 16, 4, r, 2)) for r in (0, 1)]
    assert sorted(one.tolist()) == sorted(np.concatenate(two).tolist()) == sorted(items[800:816].tolist())
    # without weights: one shuffled stream over all blocks (a single source is the stream it always was)
    assert type(train_stream([500, 300], [], 3)).__name__ == "BlockStream"


def test_concat_split_reads_each_row_from_its_source(mix):
    abc, text, _ = mix
    a, t = open_split(abc, "train"), open_split(text, "train")
    cs = ConcatSplit([a, t])
    rows = np.array([len(a), 0, len(a) + len(t) - 1, 1])
    assert len(cs) == len(a) + len(t)
    assert np.array_equal(cs.tokens[rows], np.stack([t.tokens[0], a.tokens[0], t.tokens[len(t) - 1], a.tokens[1]]))
    assert np.array_equal(cs.pos[rows][:, :5], np.stack([t.pos[0], a.pos[0], t.pos[-1], a.pos[1]])[:, :5])
    assert cs.source_of(np.array([-1, 0, len(a), len(a) - 1])).tolist() == [-1, 0, 1, 0]


def _refusal(**kw) -> str:
    with pytest.raises(ConfigError) as e:
        check_data(load_config(None, [f"{k}={v}" for k, v in kw.items()]))
    msg = str(e.value)
    assert "\n" not in msg and "Fix:" in msg
    return msg


def test_bad_mixtures_are_refused_in_one_line_before_any_model_loads(mix, tmp_path, tokenizer_dir):
    """Weights negative, all zero or not one per dir; a dir twice; dirs made with another tokenizer or max_len."""
    abc, text, root = mix
    both = f"{abc},{text}"
    assert "negative" in _refusal(data_dir=both, data_weights="0.5,-1")
    assert "all 0" in _refusal(data_dir=both, data_weights="0,0")
    assert "2 weights for 3" in _refusal(data_dir=f"{both},{root / 'other'}", data_weights="1,1")
    assert "twice" in _refusal(data_dir=f"{abc},{abc}")
    longer = _preprocess(tokenizer_dir, str(root / "text.jsonl"), tmp_path / "long", "--content", "text",
                         "--max_len", "128")
    assert "max_len 128" in _refusal(data_dir=f"{abc},{longer}")
    from data_preprocess.train_tokenizer import main as train_tokenizer

    other_tok = tmp_path / "tok2"
    assert train_tokenizer(["-o", str(other_tok), "--vocab_size", "500", "--max_lines", "3000"]) == 0
    other = _preprocess(other_tok, str(root / "text.jsonl"), tmp_path / "other_tok", "--content", "text")
    assert "another tokenizer" in _refusal(data_dir=f"{abc},{other}", data_weights="0.5,0.5")
    ok = check_data(load_config(None, [f"data_dir={both}", "data_weights=3,1"]))
    assert [s["weight"] for s in ok] == [0.75, 0.25] and [s["name"] for s in ok] == ["abc", "text"]


ARGS = ["model=llama-tiny", "max_steps=6", "global_batch_size=8", "micro_batch_size=4", "lr=3e-3",
        "warmup_ratio=0.2", "log_every=1", "eval_every=3", "report_to=none", "data_weights=0.75,0.25"]


@pytest.mark.slow
def test_a_mixture_trains_logs_each_source_and_resumes_exactly(mix, tmp_path):
    """The engine on ABC + text shards: per-source train and val losses in metrics.jsonl (the step's loss is
    their token-weighted mean), the sources and shares in job.json, and a run stopped at step 3 and resumed
    gives the straight run's losses."""
    abc, text, _ = mix
    data = f"data_dir={abc},{text}"
    straight = tmp_path / "straight"
    run_train([data, f"output_dir={straight}", *ARGS])
    recs = read_metrics(straight / "metrics.jsonl", "loss/abc")
    assert sorted(recs) == [1, 2, 3, 4, 5, 6]
    for r in recs.values():
        assert "loss/text" in r and min(r["loss/abc"], r["loss/text"]) <= r["loss"] <= max(r["loss/abc"], r["loss/text"])
    ev = read_metrics(straight / "metrics.jsonl", "val_loss")[6]
    assert {"val_loss/abc", "val_loss/text", "val_bpc/abc", "val_bpc/text"} <= set(ev)
    assert min(ev["val_loss/abc"], ev["val_loss/text"]) <= ev["val_loss"] <= max(ev["val_loss/abc"], ev["val_loss/text"])
    job = read_json(straight / "job.json")
    assert [(s["name"], s["weight"]) for s in job["data"]["sources"]] == [("abc", 0.75), ("text", 0.25)]

    resumed = tmp_path / "resumed"
    run_train([data, f"output_dir={resumed}", *ARGS, "save_every=3"], fault="3:after_step",
              expect_rc=None)  # SIGKILLed right after step 3's checkpoint
    run_train([data, f"output_dir={resumed}", *ARGS, "save_every=3", "resume=auto"])
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6] and (resumed / "checkpoints" / "step-00000003").is_dir()
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])

    # two ranks (ZeRO-2, one micro-batch each per step): the same global batches, so the same losses per source
    ranks = tmp_path / "two_ranks"
    run_train([data, f"output_dir={ranks}", *ARGS, "ds_config=ds_configs/zero2.json"], launcher="torchrun", nproc=2)
    two = read_metrics(ranks / "metrics.jsonl", "loss/abc")
    for s, r in recs.items():
        for k in ("loss", "loss/abc", "loss/text"):
            assert abs(two[s][k] - r[k]) < 1e-4, (s, k, two[s][k], r[k])
