"""Corpus ingest: splitting, normalisation, metadata, validation reasons, malformed input, dedup, splits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_preprocess import corpus
from data_preprocess.corpus import CorpusStats, Reject, iter_tunes, split_of
from data_preprocess.hub import ArgumentError

MULTI = (
    "% file header: a comment and a directive, no tune\r\n"
    "%%abc-charset utf-8\r\n"
    "\r\n"
    "X:1\r\n"
    "T:The Kesh   \r\n"
    "T:The Kesh Jig\r\n"
    "R:jig\r\n"
    "M:6/8\r\n"
    "L:1/8\r\n"
    "O:Irish\r\n"
    "S:Session notes\r\n"
    "Z:transcribed by someone\r\n"
    "C:Trad.\r\n"
    "K:G % the key\r\n"
    "% a comment line inside the tune\r\n"
    "%%MIDI program 73\r\n"
    "|:GAG GAB|ABA ABd|edd gdd|edB dBA:|\t\r\n"
    "\r\n"
    "\r\n"
    "\r\n"
    "X:2\r\n"
    "T:Drowsy Maggie\r\n"
    "R:reel\r\n"
    "M:C|\r\n"
    "L:1/8\r\n"
    "K:Edor\r\n"
    "|:E2BE dEBE|E2BE AFDF:|\r\n"
    "X:3\r\n"
    "T:Only a header\r\n"
    "K:D\r\n"
)


def _write(p: Path, data: str | bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if isinstance(data, bytes) else p.write_text)(data)
    return p


def _run(source, **kw):
    stats, rejects = CorpusStats(), []
    tunes = list(iter_tunes(str(source), stats=stats, on_reject=rejects.append, **kw))
    return tunes, stats, rejects


def test_split_normalise_metadata(tmp_path):
    f = _write(tmp_path / "a.abc", MULTI.encode())
    tunes, stats, rejects = _run(f)
    assert [t.index for t in tunes] == [0, 1]
    assert tunes[0].text == (
        "X:1\nT:The Kesh\nT:The Kesh Jig\nR:jig\nM:6/8\nL:1/8\nO:Irish\nS:Session notes\n"
        "Z:transcribed by someone\nC:Trad.\nK:G % the key\n%%MIDI program 73\n|:GAG GAB|ABA ABd|edd gdd|edB dBA:|\n")
    assert tunes[1].text == "X:2\nT:Drowsy Maggie\nR:reel\nM:C|\nL:1/8\nK:Edor\n|:E2BE dEBE|E2BE AFDF:|\n"
    m = tunes[0].meta
    assert (m["ref"], m["title"], m["titles"], m["rhythm"], m["meter"], m["unit"], m["key"]) == (
        "1", "The Kesh", ["The Kesh", "The Kesh Jig"], "jig", "6/8", "1/8", "G")
    assert (m["origin"], m["source"], m["transcription"], m["composer"]) == (
        "Irish", "Session notes", "transcribed by someone", "Trad.")
    assert tunes[1].meta["key"] == "Edor" and tunes[1].meta["meter"] == "C|"
    assert all(t.file == str(f) for t in tunes)
    # the header-only tune is rejected with its location, the file header is not a tune
    assert [(r.file, r.index, r.reason) for r in rejects] == [(str(f), 2, "no_body")]
    assert (stats.files, stats.tunes_read, stats.kept, dict(stats.rejected)) == (1, 3, 2, {"no_body": 1})


def test_every_reject_reason_is_reachable(tmp_path):
    d = tmp_path / "corpus"
    _write(d / "reasons.abc",
           "X:1\nT:no key\nM:4/4\nabc|\n\n"                           # no_key
           "X:2\nT:no body\nK:D\n%%MIDI program 1\nW:words only\n\n"  # no_body
           "X:3\nT:long\nK:D\n" + "abc" * 2000 + "\n\n"               # line_too_long
           "X:4\nT:good\nK:D\nABc dcB|\n")
    _write(d / "binary.abc", b"X:1\nK:D\n" + bytes(range(256)) * 8 + b"\n")   # undecodable
    _, stats, rejects = _run(d)
    got = {r.reason: r for r in rejects}
    assert set(got) == {"no_key", "no_body", "line_too_long", "undecodable"}
    assert got["no_key"].index == 0 and got["no_body"].index == 1 and got["line_too_long"].index == 2
    assert got["undecodable"].file.endswith("binary.abc") and "undecodable" in got["undecodable"].detail
    assert stats.kept == 1

    jl = _write(tmp_path / "t.jsonl", '{"text": "X:1\\nK:D\\nabc|\\n"}\n{not json\n{"abc": "X:1"}\n'
                                      '{"text": 5}\n["a list"]\n')
    tunes, stats, rejects = _run(jl)
    assert len(tunes) == 1 and tunes[0].file == f"{jl}:1"
    assert [(r.file, r.reason) for r in rejects] == [
        (f"{jl}:2", "bad_json"), (f"{jl}:3", "no_text_field"), (f"{jl}:4", "no_text_field"),
        (f"{jl}:5", "no_text_field")]
    assert set(corpus.REJECT_REASONS) >= set(stats.rejected)


def test_malformed_files_never_crash_or_drop_neighbours(tmp_path):
    good = "X:{n}\nT:Tune {n}\nM:4/4\nK:D\n" + "ABcd efga|" * 3 + "{n}\n"
    d = tmp_path / "bad"
    _write(d / "01_empty.abc", b"")
    _write(d / "02_garbage.abc", bytes((i * 37 + 11) % 256 for i in range(20000)))
    _write(d / "03_truncated.abc", good.format(n=1) + "\nX:2\nT:cut off her")
    _write(d / "04_oneline.abc", "X:1 " + "a" * (1 << 20))                          # 1 MB single line
    latin1 = ("X:5\nT:Caf\u00e9 Ol\u00e9\nK:G\nGABc|\n").encode("latin-1")
    utf8 = ("X:6\nT:S\u00e6tre \u00e9t\u00e9\nK:G\nBcde|\n").encode()
    _write(d / "05_mixed.abc", utf8 + b"\n" + latin1 + b"\n" + good.format(n=7).encode())
    _write(d / "06_garbage_between.abc", good.format(n=8).encode() + b"\nX:9\n" + bytes(range(256)) * 40
           + b"\n\n" + good.format(n=10).encode())
    _write(d / "07_nul_prefix.abc", b"\x00\x01\x02" * 100 + b"\n" + good.format(n=11).encode())
    tunes, stats, rejects = _run(d)
    titles = sorted(t.meta["title"] for t in tunes)
    assert titles == sorted(["Tune 1", "Caf\u00e9 Ol\u00e9", "S\u00e6tre \u00e9t\u00e9", "Tune 7", "Tune 8",
                             "Tune 10", "Tune 11"])
    assert stats.empty_files == 1 and stats.recoded_cp1252 >= 1
    reasons = {(Path(r.file).name, r.reason) for r in rejects}
    assert ("02_garbage.abc", "undecodable") in reasons
    assert ("03_truncated.abc", "no_key") in reasons
    assert ("04_oneline.abc", "line_too_long") in reasons
    assert ("06_garbage_between.abc", "undecodable") in reasons


def test_streaming_blocks_equal_whole_file(tmp_path, monkeypatch):
    """Tiny read blocks (cuts inside tunes, inside CRLF pairs) give exactly the tunes of one big read;
    an oversize tune is cut and rejected without losing its neighbours."""
    f = _write(tmp_path / "m.abc", (MULTI * 5).encode())
    whole, _, _ = _run(f, dedup=False)
    for block in (7, 64, 333):
        monkeypatch.setattr(corpus, "READ_BLOCK", block)
        small, _, _ = _run(f, dedup=False)
        assert [(t.text, t.index) for t in small] == [(t.text, t.index) for t in whole]
    monkeypatch.setattr(corpus, "READ_BLOCK", 256)
    monkeypatch.setattr(corpus, "MAX_SEGMENT_BYTES", 2048)
    big = _write(tmp_path / "big.abc", "X:1\nT:ok\nK:D\nabc|\nX:2\nT:huge\nK:D\n" + "abc|\n" * 2000
                 + "X:3\nT:ok too\nK:D\ndef|\n")
    tunes, _, rejects = _run(big)
    assert [t.meta["title"] for t in tunes] == ["ok", "ok too"]
    assert [(r.index, r.reason) for r in rejects] == [(1, "line_too_long")]


def test_dedup_by_music_not_title(tmp_path):
    body = "|:GAG GAB|ABA ABd:|\n"
    _write(tmp_path / "d" / "a.abc", f"X:1\nT:First\nM:6/8\nK:G\n{body}\nX:2\nT:Other name\nM:6/8\nK:G\n"
           + body.replace(" ", "  ") + "\nX:3\nT:First\nM:6/8\nK:D\n" + body)
    tunes, stats, _ = _run(tmp_path / "d")
    assert [t.meta["ref"] for t in tunes] == ["1", "3"]       # X:2 = same music; X:3 differs in key
    assert stats.duplicates == 1 and stats.kept == 2
    tunes, stats, _ = _run(tmp_path / "d", dedup=False)
    assert len(tunes) == 3 and stats.duplicates == 0


def test_split_is_deterministic_and_stable():
    hashes = [f"{i:032x}" for i in range(4000)]
    a = [split_of(h, 0.1, seed=0) for h in hashes]
    assert a == [split_of(h, 0.1, seed=0) for h in hashes]             # deterministic
    assert 0.07 < a.count("val") / len(a) < 0.13
    assert [split_of(h, 0.1, 0) for h in hashes[:100]] == a[:100]     # independent of the others
    assert a != [split_of(h, 0.1, seed=1) for h in hashes]
    assert all(split_of(h, 0.0) == "train" for h in hashes[:50])


def test_jsonl_text_field_and_datasets_dir(tmp_path):
    import datasets

    recs = [{"abc": "X:1\nT:A\nK:D\nabc|\nX:2\nT:B\nK:D\ndef|\n"}, {"abc": "T:no X\nK:A\nAAA|\n"}]
    jl = _write(tmp_path / "r.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    tunes, _, rejects = _run(jl, text_field="abc")
    assert [t.meta["title"] for t in tunes] == ["A", "B", "no X"] and not rejects
    ds_dir = tmp_path / "ds"
    datasets.Dataset.from_list(recs).save_to_disk(str(ds_dir))
    tunes2, _, _ = _run(ds_dir, text_field="abc")
    assert [t.text for t in tunes2] == [t.text for t in tunes]
    with pytest.raises(ArgumentError, match="no column 'text'"):
        _run(ds_dir)
    with pytest.raises(ArgumentError, match="no such file"):
        _run(tmp_path / "missing.abc")


def test_music21_subset():
    tunes, stats, rejects = _run("music21", limit=40)
    assert len(tunes) == 40 and stats.kept == 40 and not rejects
    assert all(t.meta.get("key") and t.text.endswith("\n") and "\r" not in t.text for t in tunes)
    assert len({t.body_hash for t in tunes}) == 40


def test_abc2midi_check_real_binary():
    pytest.importorskip("data_preprocess.abctools").require("abc2midi")
    assert corpus.abc2midi_problem("X:1\nT:ok\nM:4/4\nL:1/8\nK:D\nABcd efga|\n") is None
    why = corpus.abc2midi_problem("X:1\nT:bad\nK:Q\nabc\n")       # abc2midi writes no MIDI for this
    assert why and "K:" in why
    assert isinstance(Reject("f", 0, "abc2midi", why).to_json()["detail"], str)
