"""Shard building: packing invariants, worker determinism, SFT masking/truncation, metadata SFT, the CLI,
tokenizer round trip on real tunes, the abc2midi check path, the music21 corpus end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_preprocess.corpus import iter_tunes, split_of
from data_preprocess.hub import ArgumentError
from data_preprocess.preprocess import PreprocessConfig, run
from data_preprocess.sft import describe_key, metadata_conversations
from data_preprocess.shards import SPLITS, open_split, read_meta
from data_preprocess.train_tokenizer import batch_encode

REPO = Path(__file__).resolve().parents[1]


def _tunes_dir(tmp_path: Path) -> Path:
    d = tmp_path / "abc"
    d.mkdir()
    long_body = "".join(f"|:ABcd efga|bagf edcB|{'GABc ' * (i % 4 + 1)}:|\n" for i in range(60))
    (d / "a.abc").write_text(
        "X:1\nT:Short\nM:6/8\nR:jig\nK:D\nDFA dAF|GBd gdB:|\n\n"
        f"X:2\nT:Very long\nM:4/4\nK:G\n{long_body}\n"
        "X:3\nT:Middle\nM:3/4\nK:Am\nA2 B2 c2|e4 d2|c6:|\n\n"
        "X:4\nT:Duplicate of 1\nM:6/8\nR:jig\nK:D\nDFA dAF|GBd gdB:|\n\n"
        "X:5\nT:no key\nabc\n")
    (d / "b.abc").write_text("".join(f"X:{i}\nT:Tune {i}\nM:2/4\nL:1/8\nK:{'DGAEC'[i % 5]}\n"
                                     f"{'abcdefg'[i % 7]}2 {'ABCDEFG'[(i * 3) % 7]}2|c{i % 9}B A2:|\n\n"
                                     for i in range(40)))
    return d


def _docs(data_dir: Path, split: str, meta: dict):
    """Reassembles documents from the packed blocks: (ids, mask) per document, continuation pieces
    (a block that starts inside a document) glued back onto their document."""
    s = open_split(data_dir, split, meta)
    toks, mask, pos = (np.asarray(a).reshape(-1) for a in (s.tokens, s.loss_mask, s.pos))
    L = meta["max_len"]
    n_real = meta["splits"][split]["num_tokens"] + meta["splits"][split]["num_padding_tokens"]
    assert n_real == len(toks)
    docs, cur = [], None
    for i in range(len(toks)):
        if pos[i] == 0 and toks[i] == meta["bos_id"]:
            cur = ([], [])
            docs.append(cur)
        elif pos[i] == 0:
            assert i % L == 0, "a segment start that is not a document (BOS) must be a block start"
        if cur is not None:
            cur[0].append(int(toks[i]))
            cur[1].append(int(mask[i]))
    return docs


def test_pt_packing_invariants(tmp_path, tokenizer_dir):
    src = _tunes_dir(tmp_path)
    out = tmp_path / "pt"
    meta = run(PreprocessConfig(tokenizer=str(tokenizer_dir), input=str(src), output_dir=str(out), max_len=64,
                                val_ratio=0.2, progress=False))
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    tunes = list(iter_tunes(str(src)))
    assert meta["counts"]["kept"] == len(tunes) == 43 and meta["counts"]["duplicates"] == 1
    assert meta["counts"]["rejected"] == {"no_key": 1}
    expect = {s: [] for s in SPLITS}
    for t in tunes:
        expect[split_of(t.body_hash, 0.2, 0)].append([tok.bos_token_id] + tok.encode(t.text, add_special_tokens=False)
                                                      + [tok.eos_token_id])
    assert expect["val"] and expect["train"]
    total = 0
    for s in SPLITS:
        st = meta["splits"][s]
        assert st["num_tokens"] == sum(map(len, expect[s]))        # no token lost, BOS/EOS included
        sp = open_split(out, s, meta)
        assert int((np.asarray(sp.tokens) != meta["pad_id"]).sum()) == st["num_tokens"]
        assert int(np.asarray(sp.loss_mask).sum()) == st["num_tokens"]   # pt: every real token a target
        docs = _docs(out, s, meta)
        # strip the final padding (mask 0) and compare document by document, in input order
        got = [[t for t, m in zip(ids, mk) if m] for ids, mk in docs]
        assert got == expect[s]
        total += st["num_tokens"]
    assert total == meta["counts"]["tokens"]
    # the long tune straddles several 64-token blocks and positions restart at each block
    longest = max(len(d) for d in expect["train"] + expect["val"])
    assert longest > 3 * 64 and meta["counts"]["longest_sequence_tokens"] == longest
    assert sum(meta["splits"][s]["num_split_docs"] for s in SPLITS) >= 3
    assert 0.5 < meta["counts"]["packing_efficiency"] <= 1.0
    assert (out / "tokenizer" / "tokenizer.model").is_file()
    assert read_meta(out)["tokenizer"]["hash"] == meta["tokenizer"]["hash"]


def test_workers_give_identical_output(tmp_path, tokenizer_dir):
    src = _tunes_dir(tmp_path)
    outs = []
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        run(PreprocessConfig(tokenizer=str(tokenizer_dir), input=str(src), output_dir=str(out), max_len=64,
                             workers=w, chunk_size=5, progress=False))
        outs.append(out)
    for s in SPLITS:
        for kind in ("tokens", "loss_mask", "pos"):
            assert (outs[0] / f"{s}.{kind}.bin").read_bytes() == (outs[1] / f"{s}.{kind}.bin").read_bytes()


def test_sft_masking_truncation_and_bad_records(tmp_path, tokenizer_dir):
    recs = [
        {"instruction": "Write a jig in D.", "input": "", "output": "X:1\nK:D\nDFA dAF|\n"},
        {"instruction": "Continue this tune:", "input": "X:1\nK:G\nGAB", "output": "cde|\n"},
        {"messages": [{"role": "system", "content": "You are a composer."},
                      {"role": "user", "content": "A reel please."}, {"role": "assistant", "content": "X:1\nK:A\nABcd|\n"},
                      {"role": "user", "content": "Now in G."}, {"role": "assistant", "content": "X:2\nK:G\nGABc|\n"}]},
        {"instruction": "Long one", "output": "abcdefg " * 200},
    ]
    lines = [json.dumps(r) for r in recs] + ["{broken", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                                             json.dumps(recs[0])]
    src = tmp_path / "sft.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "sft"
    meta = run(PreprocessConfig(tokenizer=str(tokenizer_dir), input=str(src), output_dir=str(out), mode="sft",
                                max_len=256, val_ratio=0.0, progress=False))
    c = meta["counts"]
    assert c["rejected"] == {"bad_json": 1, "bad_record": 1} and c["duplicates"] == 1
    assert c["sft"]["truncated"] == 1 and c["sft"]["truncated_tokens"] > 0 and c["sft"]["conversations"] == 4
    rej = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["reason"]) for r in rej] == [(f"{src}:5", "bad_json"), (f"{src}:6", "bad_record")]
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    docs = _docs(out, "train", meta)
    assert len(docs) == 4
    eos = tok.eos_token_id
    answers = [[recs[0]["output"]], [recs[1]["output"]],
               [m["content"] for m in recs[2]["messages"] if m["role"] == "assistant"]]
    for (ids, mask), ans in zip(docs[:3], answers):
        ids, mask = np.array(ids), np.array(mask)
        real = ids != meta["pad_id"]
        ids, mask = ids[real], mask[real]
        # target tokens are exactly the answers, each followed by " " and EOS
        target = ids[mask == 1]
        pieces = np.split(target, np.where(target == eos)[0] + 1)[:-1]
        assert [tok.decode(p[:-1]) for p in pieces] == [a + " " for a in ans]
        assert all(p[-1] == eos for p in pieces)
        # the whole sequence is the ChatMusician format
        text = tok.decode(ids, skip_special_tokens=False).replace(" </s> ", "</s>").replace("</s> ", "</s>")
        assert text.startswith("<s>") and "Human: " in text and text.count("Assistant: ") == len(ans)
        assert ids[0] == tok.bos_token_id and mask[0] == 0
    ids, mask = (np.array(x) for x in docs[3])
    assert len(ids) == 256 and mask[-1] == 1   # the truncated one fills one whole block, still has targets
    # no conversation straddles blocks in sft mode: every document starts its own segment inside a block
    assert meta["splits"]["train"]["num_split_docs"] == 0


def test_sft_from_metadata_music21_end_to_end(tmp_path, tokenizer_dir):
    out = tmp_path / "m21"
    meta = run(PreprocessConfig(tokenizer=str(tokenizer_dir), input="music21", output_dir=str(out), mode="sft",
                                make_sft_from_metadata=True, music2text_fraction=1.0, limit=30, max_len=1024,
                                progress=False))
    c = meta["counts"]
    assert c["kept"] == 30 and c["sft"]["text2music"] == 30 and c["sft"]["music2text"] >= 25
    assert c["sequences"] == c["sft"]["conversations"] == sum(c["split_sizes"].values())
    tunes = list(iter_tunes("music21", limit=30))
    kinds = [metadata_conversations(t) for t in tunes]
    quarter = [cv.kind for t in tunes for cv in metadata_conversations(t, 0.25)]
    assert quarter.count("text2music") == 30 and 2 <= quarter.count("music2text") <= 14   # ~ a quarter of 30
    assert [cv.kind for t in tunes for cv in metadata_conversations(t, 0.0)] == ["text2music"] * 30
    prompts = {conv.turns[0][1].split("\n")[0] for cs in kinds for conv in cs if conv.kind == "text2music"}
    assert len(prompts) > 5                                  # templates vary
    t2m = next(cv for cv in kinds[0] if cv.kind == "text2music")
    assert t2m.turns[1][1] == tunes[0].text.rstrip("\n")     # the answer is the tune itself
    m2t = next(cv for cv in kinds[0] if cv.kind == "music2text")
    assert describe_key(tunes[0].meta["key"]) in m2t.turns[1][1] and "T:" not in m2t.turns[0][1]
    assert describe_key("Dmix") == "D mixolydian" and describe_key("F#m") == "F sharp minor"
    assert describe_key("Bb") == "B flat major" and describe_key("E Minor") == "E minor" and describe_key("none") is None


def test_tokenizer_round_trip_on_real_tunes(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [t.text for t in iter_tunes("music21", limit=400)]
    texts += ["X:1\nT:Caf\u00e9 \u00e6\u00f8\u00e5 \u266f\nK:D\n\"Am\"A2 {g}f/e/ | [CEG] z4 \\\n  (3abc ||\n"]
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    bad = [t for t, ids in zip(texts, enc) if tok.decode(ids) != t]
    assert not bad, bad[0][:200]
    assert batch_encode(tok, texts) == enc        # the pipeline's fast path gives the wrapper's ids


def test_abc2midi_check_path(tmp_path, tokenizer_dir):
    from data_preprocess.abctools import require

    require("abc2midi")
    src = tmp_path / "c.abc"
    src.write_text("X:1\nT:fine\nM:4/4\nL:1/8\nK:D\nABcd efga|\n\nX:2\nT:broken key\nK:Q\nabc|\n\n"
                   "X:3\nT:fine too\nM:3/4\nL:1/4\nK:G\nGAB|\n")
    out = tmp_path / "chk"
    meta = run(PreprocessConfig(tokenizer=str(tokenizer_dir), input=str(src), output_dir=str(out), max_len=64,
                                check="abc2midi", workers=2, progress=False))
    assert meta["counts"]["rejected"] == {"abc2midi": 1} and meta["counts"]["kept"] == 2
    rej = json.loads((out / "rejects.jsonl").read_text())
    assert rej["index"] == 1 and rej["reason"] == "abc2midi" and "abc2midi" in rej["detail"]


def test_cli_subprocess_strict_and_meta(tmp_path, tokenizer_dir):
    src = _tunes_dir(tmp_path)
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "data_preprocess.preprocess", "-t", str(tokenizer_dir), "-i", str(src), "-o", str(out),
           "--mode", "pt", "--max_len", "128", "-w", "1", "--no_progress", "--strict", "val_ratio=0.1"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "no_key" in p.stderr and "a.abc tune 4" in p.stderr         # the reject is listed
    assert "packing efficiency" in p.stdout                             # the summary table
    meta = read_meta(out)
    for k in ("mode", "max_len", "vocab_size", "pad_id", "bos_id", "eos_id", "splits", "tokenizer", "counts",
              "versions"):
        assert k in meta
    assert meta["config"]["val_ratio"] == 0.1 and meta["tokenizer"]["vocab_size"] == meta["vocab_size"]
    assert meta["counts"]["files"] == 2 and meta["counts"]["tunes_read"] == 45
    assert AutoTokenizer.from_pretrained(out / "tokenizer").pad_token_id == meta["pad_id"]
    bad = subprocess.run(cmd[:-2] + ["nonsense_key=1"], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300, check=False)
    assert bad.returncode != 0 and "unknown config key 'nonsense_key'" in bad.stderr


def test_tiny_input_keeps_one_val_sequence_or_warns(tmp_path, tokenizer_dir, capsys):
    """2 valid records used to give `train / val sequences 2 / 0` silently, which training then refused."""
    from data_preprocess.corpus import split_hash
    from data_preprocess.sft import Conversation
    from training.config import Environment, TrainConfig, validate

    recs = [{"instruction": "Write a jig in D.", "output": "X:1\nK:D\nDFA dAF|\n"},
            {"instruction": "Write a reel in G.", "output": "X:1\nK:G\nGABc dBAG|\n"}]
    keys = [Conversation([("user", r["instruction"]), ("assistant", r["output"])], "", 0).key for r in recs]
    assert [split_of(k, 0.02) for k in keys] == ["train", "train"]  # by hash, neither would go to val
    src = tmp_path / "two.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "sft"
    cmd = [sys.executable, "-m", "data_preprocess.preprocess", "-t", str(tokenizer_dir), "-i", str(src), "-o", str(out),
           "--mode", "sft", "--max_len", "128", "--no_progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                       timeout=300, check=False)
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr[-2000:]
    assert "train / val sequences  1 / 1 (no unit hashed into val: the one of lowest hash was moved there)" in p.stdout
    meta = read_meta(out)
    lowest = min(keys, key=split_hash)
    assert meta["counts"]["val_fallback"] == lowest and meta["splits"]["val"]["num_docs"] == 1
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    val_text = tok.decode(np.asarray(open_split(out, "val", meta).tokens).reshape(-1))
    assert recs[keys.index(lowest)]["instruction"] in val_text  # the chosen one, all of it, nothing lost
    assert recs[1 - keys.index(lowest)]["instruction"] not in val_text
    validate(TrainConfig(data_dir=str(out), mode="sft", model="llama-tiny", output_dir=str(tmp_path / "run"),
                         global_batch_size=1, micro_batch_size=1, max_steps=1), Environment(1, "cpu"))  # trainable
    # one record, or --val_ratio 0: nothing can go to val, and preprocess says so
    for n, ratio, why in ((1, 0.02, "fewer than 2 kept tunes/records"), (2, 0.0, "--val_ratio is 0")):
        src.write_text("".join(json.dumps(r) + "\n" for r in recs[:n]))
        meta = run(PreprocessConfig(tokenizer=str(tokenizer_dir), input=str(src), output_dir=str(out), mode="sft",
                                    max_len=128, val_ratio=ratio, progress=False))
        err = capsys.readouterr().err
        assert meta["counts"]["split_sizes"] == {"train": n, "val": 0} and meta["counts"]["val_fallback"] is None
        assert f"warning: the val split is empty ({why}" in err and "Fix: preprocess at least 2" in err


@pytest.mark.parametrize("field", ["tokenizer", "output_dir"])
def test_config_requires_paths(field):
    kw = {"tokenizer": "t", "output_dir": "o", field: ""}
    with pytest.raises(ArgumentError, match=field.split("_")[0]):
        PreprocessConfig(**kw)


def test_parts_merged_equal_one_machine(tmp_path, tokenizer_dir):
    """preprocess --num_shards 3 --shard_index i (each reading the whole input) + merge_parts = the one-machine
    run's documents in each split (same dedup, same hash split), counts summed; each part's counts in its
    meta."""
    from data_preprocess.merge_parts import merge_parts

    src = _tunes_dir(tmp_path)
    kw = {"tokenizer": str(tokenizer_dir), "input": str(src), "max_len": 64, "val_ratio": 0.2, "progress": False}
    one = run(PreprocessConfig(output_dir=str(tmp_path / "one"), **kw))
    parts = [tmp_path / f"part-{i}" for i in range(3)]
    metas = [run(PreprocessConfig(output_dir=str(p), num_shards=3, shard_index=i, **kw)) for i, p in enumerate(parts)]
    assert [m["part"] for m in metas] == [{"index": i, "of": 3} for i in range(3)]
    assert sum(m["counts"]["kept"] for m in metas) == one["counts"]["kept"] == 43
    assert all(m["counts"]["kept"] < 43 for m in metas)                    # the work is split
    assert sum(m["counts"]["duplicates"] for m in metas) == 1              # duplicates meet in one part
    assert sum(m["counts"]["rejected_total"] for m in metas) == 1          # a reject is reported once
    merged = merge_parts([str(p) for p in reversed(parts)], str(tmp_path / "merged"))  # (any order)
    assert merged["counts"]["kept"] == 43 and merged["counts"]["rejected"] == {"no_key": 1}
    assert [p["index"] for p in merged["counts"]["per_part"]] == [0, 1, 2]
    for s in SPLITS:
        want = sorted((tuple(i for i, m in zip(ids, mk) if m),) for ids, mk in _docs(tmp_path / "one", s, one))
        got = sorted((tuple(i for i, m in zip(ids, mk) if m),) for ids, mk in _docs(tmp_path / "merged", s, merged))
        assert got == want and want, s
        assert merged["splits"][s]["num_tokens"] == one["splits"][s]["num_tokens"]
    assert read_meta(tmp_path / "merged")["tokenizer"]["hash"] == one["tokenizer"]["hash"]


def test_bad_parts_are_one_line(tmp_path, tokenizer_dir, capsys):
    from data_preprocess.merge_parts import main as merge_main

    src = _tunes_dir(tmp_path)
    kw = {"tokenizer": str(tokenizer_dir), "input": str(src), "max_len": 64, "progress": False}
    parts = [tmp_path / f"p{i}" for i in range(2)]
    for i, p in enumerate(parts):
        run(PreprocessConfig(output_dir=str(p), num_shards=2, shard_index=i, **kw))
    run(PreprocessConfig(output_dir=str(tmp_path / "other"), num_shards=2, shard_index=1, **{**kw, "max_len": 32}))
    run(PreprocessConfig(output_dir=str(tmp_path / "whole"), **kw))

    def err(*argv):
        with pytest.raises(SystemExit) as e:
            merge_main(["-o", str(tmp_path / "m"), *map(str, argv)])
        assert e.value.code == 2
        out = capsys.readouterr().err.strip()
        assert out.startswith("error: ") and "\n" not in out, out
        return out

    assert "part(s) [1] of 2 missing" in err(parts[0])
    assert "more than once" in err(parts[0], parts[0], parts[1])
    assert "max_len=32" in err(parts[0], tmp_path / "other")
    assert "not written with --num_shards" in err(parts[0], tmp_path / "whole")
    from data_preprocess.merge_parts import merge_parts

    with pytest.raises(ArgumentError, match="is or holds the part"):
        merge_parts([str(p) for p in parts], str(parts[0]))
    with pytest.raises(ArgumentError, match="--shard_index 2 must be in 0..--num_shards-1"):
        PreprocessConfig(output_dir=str(tmp_path / "x"), num_shards=2, shard_index=2, **kw)


def test_add_docs_writes_what_add_writes(tmp_path):
    """The vectorised ``ShardWriter.add_docs`` (a chunk of documents as one array) writes the same bytes and
    statistics as one ``add`` per document, with documents that straddle blocks, exact fits, empty documents,
    masks and ``add_whole`` in between."""
    from data_preprocess.shards import ShardWriter

    rng = np.random.default_rng(7)
    for trial in range(60):
        L, vocab = int(rng.integers(2, 24)), (70_000 if trial % 2 else 900)
        docs = [rng.integers(0, vocab, size=int(rng.integers(0, 3 * L))) for _ in range(int(rng.integers(1, 25)))]
        masks = [rng.integers(0, 2, size=len(d)) for d in docs] if trial % 3 == 0 else None
        a, b = ShardWriter(tmp_path / f"a{trial}", "train", L, vocab, 3), ShardWriter(tmp_path / f"b{trial}", "train", L, vocab, 3)
        i = 0
        while i < len(docs):
            k = int(rng.integers(1, 6))
            for j in range(i, min(i + k, len(docs))):
                a.add(docs[j], None if masks is None else masks[j])
            b.add_docs(np.concatenate(docs[i:i + k]), [len(d) for d in docs[i:i + k]],
                       None if masks is None else np.concatenate(masks[i:i + k]))
            if rng.random() < 0.25:
                whole = rng.integers(0, vocab, size=int(rng.integers(1, L + 1)))
                a.add_whole(whole)
                b.add_whole(whole)
            i += k
        assert a.close() == b.close()
        for kind in ("tokens", "loss_mask", "pos"):
            assert ((tmp_path / f"a{trial}" / f"train.{kind}.bin").read_bytes()
                    == (tmp_path / f"b{trial}" / f"train.{kind}.bin").read_bytes()), (trial, kind)
    with pytest.raises(ValueError, match="lengths sum to 3"):
        ShardWriter(tmp_path / "c", "train", 8, 900, 3).add_docs(np.arange(4), [1, 2])


_LIGHT_MAIN = r"""
import sys
from data_preprocess.preprocess import main
rc = main(sys.argv[1:])
print("HEAVY:", sorted(m for m in ("transformers", "torch") if m in sys.modules))
raise SystemExit(rc)
"""


def test_pt_with_workers_keeps_the_main_process_light(tmp_path, tokenizer_dir):
    """With -w 2 a worker loads the tokenizer (transformers imports torch, ~2.5 s) while the main process reads
    the corpus: the main process never imports either, and the shards are byte-identical to -w 1's."""
    src = _tunes_dir(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    outs = {}
    for w in (1, 2):
        outs[w] = tmp_path / f"cli_w{w}"
        p = subprocess.run([sys.executable, "-c", _LIGHT_MAIN, "-t", str(tokenizer_dir), "-i", str(src), "-o",
                            str(outs[w]), "--max_len", "64", "--chunk_size", "4", "-w", str(w), "--no_progress"],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
        assert p.returncode == 0, p.stderr[-2000:]
        heavy = p.stdout.strip().splitlines()[-1]
        assert heavy == ("HEAVY: []" if w == 2 else "HEAVY: ['torch', 'transformers']"), heavy
    for s in SPLITS:
        for kind in ("tokens", "loss_mask", "pos"):
            assert (outs[1] / f"{s}.{kind}.bin").read_bytes() == (outs[2] / f"{s}.{kind}.bin").read_bytes()
    m1, m2 = read_meta(outs[1]), read_meta(outs[2])
    assert m1["tokenizer"]["hash"] == m2["tokenizer"]["hash"] and m1["counts"] == m2["counts"]
    assert AutoTokenizer.from_pretrained(outs[2] / "tokenizer").pad_token_id == m2["pad_id"]


def test_bad_tokenizer_with_workers_is_one_line(tmp_path):
    """The tokenizer is loaded in a worker with -w 2: a bad -t still ends the run with the loader's one line
    (a worker that raised SystemExit would hang the pool instead)."""
    src = _tunes_dir(tmp_path)
    bad = tmp_path / "no_tokenizer_here"
    bad.mkdir()
    p = subprocess.run([sys.executable, "-m", "data_preprocess.preprocess", "-t", str(bad), "-i", str(src), "-o",
                        str(tmp_path / "out"), "-w", "2", "--no_progress"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert "cannot load a tokenizer" in last and str(bad) in last, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_workers_encode_with_what_the_hf_tokenizer_became(tmp_path, tokenizer_dir, capsys):
    """pt workers start encoding with the -t dir's tokenizer.json while a worker loads the HF tokenizer. Here
    tokenizer_config.json declares a special token that tokenizer.json lacks, so the loaded tokenizer (and the
    copy it writes) encodes ``<|tune|>`` as one token and the raw file does not: the pass is run again with the
    copy, and the shards equal -w 1's, which always encodes with the copy."""
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    conf = json.loads((tok / "tokenizer_config.json").read_text())
    conf["extra_special_tokens"] = [*conf.get("extra_special_tokens", []), "<|tune|>"]
    (tok / "tokenizer_config.json").write_text(json.dumps(conf))
    src = tmp_path / "abc"
    src.mkdir()
    (src / "t.abc").write_text("".join(f"X:{i}\nT:T{i}\nK:C\n<|tune|>{'abcdefg'[i % 7]}2 c2|{'GABc' * (i % 3 + 1)}|\n\n"
                                       for i in range(30)))
    metas = {}
    for w in (1, 2):
        metas[w] = run(PreprocessConfig(tokenizer=str(tok), input=str(src), output_dir=str(tmp_path / f"w{w}"),
                                        max_len=64, workers=w, chunk_size=4, progress=False))
        err = capsys.readouterr().err
        assert ("encodes differently from its tokenizer.json; encoding again" in err) == (w == 2), err
    for s in SPLITS:
        for kind in ("tokens", "loss_mask", "pos"):
            assert (tmp_path / "w1" / f"{s}.{kind}.bin").read_bytes() == (tmp_path / "w2" / f"{s}.{kind}.bin").read_bytes()
    special = AutoTokenizer.from_pretrained(tmp_path / "w2" / "tokenizer").convert_tokens_to_ids("<|tune|>")
    toks = np.concatenate([np.asarray(open_split(tmp_path / "w2", s, metas[2]).tokens).ravel() for s in SPLITS])
    assert int((toks == special).sum()) == metas[2]["counts"]["kept"] == 21   # one per tune (9 are duplicates)
    assert metas[1]["counts"] == metas[2]["counts"]
