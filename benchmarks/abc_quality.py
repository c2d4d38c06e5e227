"""Quality of generated ABC tunes (or of any ABC file, as a human reference).

    python -m benchmarks.abc_quality --model M [--lora_model L] --n 100 [--prompts P] [--train_corpus C]
    python -m benchmarks.abc_quality --abc_file tunes.abc|DIR [--n 200] [--train_corpus C]

With a model, ``n`` tunes are generated: a share (``conditioned_share``) from instruction prompts
wrapped in the tokenizer's chat template (the ABC is then extracted from the reply with
``inference.abc_extract``), the rest unconditionally by continuing an ABC header (``--header``, as in
pretraining). ``--prompts`` is a JSONL file of ``{"prompt": ..., "key": "G", "meter": "6/8", "title": "..."}`` records
(key/meter/title optional; they enable the compliance checks) or a text file with one prompt per line;
without it a built-in set of key x meter requests is used.

Reported, for all tunes and per source (unconditional / conditioned / file):
* abc2midi (the real binary): share of tunes it converts ``clean``, with ``warnings`` only, or with
  ``errors`` (incl. no MIDI at all); ``parse_rate`` = MIDI produced and no error; ``midi_rate`` = MIDI
  produced at all (abc2midi reports some header trivia, e.g. unknown ``I:`` keys, as errors).
* music21 parse rate (``converter.parseData(format="abc")`` raises nothing).
* bar-duration consistency (``benchmarks.abc_metrics.check_bars``): share of bars matching M:/L:,
  and share of tunes whose every bar is consistent.
* repetition-structure rate: share of tunes with a repeat sign.
* memorisation against ``--train_corpus`` (a dir/file of ABC, a JSONL, or ``music21``): exact copies
  and near copies (>= ``overlap_threshold`` of the tune's character n-grams found in one training tune).
* key / meter compliance of conditioned tunes that asked for a key / meter.

``--constrain abc`` generates under the ABC constraint (inference/abc_constraint.py: the header fields
each prompt asks for, bars that keep time); ``--constrain both`` generates the same prompts twice, the
model alone and constrained, and reports them side by side (columns ``model`` / ``constrained``), with
each side's decode speed (``tokens_per_s``: new tokens over generation wall time) and, constrained, the
share of replies that met the constraint (ended at a legal tune end with the asked fields).
"""
from __future__ import annotations

import json
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks import abc_metrics as am
from benchmarks.common import (
    ModelArgs,
    default_output,
    environment,
    generate,
    load,
    markdown_table,
    parse_config,
    write_json,
    write_jsonl,
)
from data_preprocess.abctools import abc_to_midi
from data_preprocess.chat_format import ChatFormat
from data_preprocess.corpus import iter_tunes
from data_preprocess.hub import ArgumentError, exit_on_argument_error
from inference.abc_constraint import extract_fields
from inference.abc_extract import extract_abc

KEYS = ["C", "G", "D", "A", "F", "Bb", "Eb", "Em", "Am", "Dm", "Bm", "Gm"]
METERS = ["4/4", "3/4", "6/8", "2/4"]
_KEY_TEXT = {"m": "minor", "": "major"}
TITLES = ["The Morning Walk", "Brennan's Lament", "Over the Moor", "The Mill Race", "Lark in the Glen",
          "The Old Bridge", "Winter Fires", "A Dance for Ellen"]


def builtin_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` instruction prompts over key x meter combinations (shuffled with ``seed``); every other one also
    names a title."""
    combos = [(k, m) for k in KEYS for m in METERS]
    random.Random(seed).shuffle(combos)
    out = []
    for i in range(n):
        k, m = combos[i % len(combos)]
        tonic, mode = (k[:-1], "minor") if k.endswith("m") else (k, "major")
        tonic = tonic.replace("b", " flat")
        title = TITLES[(i // 2) % len(TITLES)] if i % 2 else None
        called = f', called "{title}"' if title else ""
        out.append({"prompt": f"Compose a folk tune in ABC notation in {tonic} {mode} with a {m} time signature{called}.",
                    "key": k, "meter": m, "title": title})
    return out


def read_prompts(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise ArgumentError(f"{p}: prompts file not found")
    out = []
    for ln, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix.lower() == ".jsonl":
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ArgumentError(f"{p}:{ln}: not valid JSON ({e.msg})") from None
            if not isinstance(r, dict) or not str(r.get("prompt", "")).strip():
                raise ArgumentError(f"{p}:{ln}: each record needs a non-empty 'prompt' field")
            out.append({"prompt": str(r["prompt"]), "key": r.get("key"), "meter": r.get("meter"),
                        "title": r.get("title")})
        else:
            out.append({"prompt": line.strip(), "key": None, "meter": None, "title": None})
    if not out:
        raise ArgumentError(f"{p}: no prompts")
    return out


def read_abc_source(source: str) -> list[str]:
    """Tunes of a plain ABC file or a directory of .abc files (recursive); ``music21`` or a JSONL /
    datasets source goes through ``data_preprocess.corpus.iter_tunes``."""
    p = Path(source)
    if p.is_file() and p.suffix.lower() != ".jsonl":
        return am.split_tunes(p.read_text(encoding="utf-8", errors="replace"))
    if p.is_dir() and any(p.rglob("*.abc")):
        tunes = []
        for f in sorted(p.rglob("*.abc")):
            tunes += am.split_tunes(f.read_text(encoding="utf-8", errors="replace"))
        return tunes
    return [t.text for t in iter_tunes(source)]


class _Timeout(Exception):
    pass


def music21_parses(abc: str, timeout: int = 30) -> tuple[bool, str | None]:
    """Whether music21 parses the tune (within ``timeout`` s when running on the main thread)."""
    from music21 import converter

    def _raise(*_):
        raise _Timeout()

    use_alarm = hasattr(signal, "SIGALRM")
    try:
        old = signal.signal(signal.SIGALRM, _raise) if use_alarm else None
        if use_alarm:
            signal.alarm(timeout)
    except ValueError:  # not the main thread
        use_alarm = False
    try:
        converter.parseData(abc, format="abc")
        return True, None
    except _Timeout:
        return False, f"timeout after {timeout}s"
    except Exception as e:  # noqa: BLE001 - any music21 failure is a parse failure
        return False, f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


def score_tunes(entries: list[dict], memo: am.MemorisationIndex | None, threshold: float,
                use_music21: bool = True) -> list[dict]:
    """Adds the per-tune checks to each entry (``abc`` None = no tune could be extracted)."""
    for e in tqdm(entries, desc="checking tunes", unit="tune"):
        abc = e.get("abc")
        if not abc:
            e.update(abc2midi="errors", abc2midi_errors=["no ABC tune in the output"], midi=False, music21=False,
                     bars=0, bars_consistent=0, all_bars_consistent=None, repeats=False, variety=None)
            continue
        r = abc_to_midi(abc)
        e["midi"] = r.ok
        e["abc2midi"] = "errors" if (r.errors or not r.ok) else "warnings" if r.warnings else "clean"
        e["abc2midi_errors"] = (r.errors or ([] if r.ok else ["no MIDI produced"]))[:3]
        e["abc2midi_warnings"] = r.warnings[:3]
        if use_music21:
            e["music21"], e["music21_error"] = music21_parses(abc)
        bc = am.check_bars(abc)
        e.update(bars=bc.n_bars, bars_consistent=bc.n_match, all_bars_consistent=bc.consistent,
                 bar_mismatches=bc.mismatches[:5], repeats=am.has_repeats(abc), variety=am.bar_variety(abc))
        if memo is not None:
            m = memo.check(abc)
            e.update(exact_copy=m["exact"], max_overlap=m["max_overlap"], near_copy=m["max_overlap"] >= threshold,
                     nearest_train_tune=m["nearest"])
        if e.get("key") or e.get("meter") or e.get("title"):
            c = am.compliance(abc, e.get("key"), e.get("meter"), e.get("title"))
            e.update(key_ok=c["key"], meter_ok=c["meter"], title_ok=c["title"])
    return entries


def summarise(entries: list[dict], use_music21: bool, memo: bool) -> dict:
    def rate(xs):
        xs = [x for x in xs if x is not None]
        return sum(bool(x) for x in xs) / len(xs) if xs else None

    n = len(entries)
    bars = sum(e["bars"] for e in entries)
    s = {
        "n": n,
        "abc_extracted": rate([bool(e.get("abc")) for e in entries]),
        "abc2midi_clean": rate([e["abc2midi"] == "clean" for e in entries]),
        "abc2midi_warnings": rate([e["abc2midi"] == "warnings" for e in entries]),
        "abc2midi_errors": rate([e["abc2midi"] == "errors" for e in entries]),
        "parse_rate": rate([e["abc2midi"] != "errors" for e in entries]),
        "midi_rate": rate([e["midi"] for e in entries]),
        "music21_parse_rate": rate([e.get("music21") for e in entries]) if use_music21 else None,
        "bar_consistency": (sum(e["bars_consistent"] for e in entries) / bars) if bars else None,
        "tunes_all_bars_consistent": rate([e["all_bars_consistent"] for e in entries if e.get("abc")]),
        "repetition_rate": rate([e["repeats"] for e in entries]),
    }
    vs = [e["variety"] for e in entries if e.get("variety") and e["variety"]["bars"]]
    if vs:  # musical variety: bars that are empty, distinct; tunes repeating one bar more than music21 ever does
        s["empty_bar_share"] = sum(v["empty"] for v in vs) / sum(v["bars"] for v in vs)
        s["distinct_bar_share"] = sum(v["distinct"] for v in vs) / max(1, sum(v["bars"] - v["empty"] for v in vs))
        s["tunes_one_bar_over_5_times"] = rate([v["max_same"] > 5 for v in vs])
    if memo:
        s["exact_copy_rate"] = rate([e.get("exact_copy") for e in entries if e.get("abc")])
        s["near_copy_rate"] = rate([e.get("near_copy") for e in entries if e.get("abc")])
    asked_key = [e for e in entries if e.get("key")]
    asked_meter = [e for e in entries if e.get("meter")]
    asked_title = [e for e in entries if e.get("title")]
    if asked_key or asked_meter:
        s["key_compliance"] = rate([e.get("key_ok", False) for e in asked_key])
        s["meter_compliance"] = rate([e.get("meter_ok", False) for e in asked_meter])
    if asked_title:
        s["title_compliance"] = rate([e.get("title_ok", False) for e in asked_title])
    return s


@dataclass
class ABCQualityConfig(ModelArgs):
    n: int = 100
    """number of tunes to generate (or to sample from --abc_file; 0 = all of the file)"""
    abc_file: str | None = None
    """score this ABC file / dir of .abc files instead of generating"""
    prompts: str | None = None
    """JSONL {prompt, key, meter} or text file of instruction prompts"""
    conditioned_share: float = 0.5
    """share of the n tunes generated from instruction prompts"""
    header: str = "X:1\n"
    """ABC text that unconditional generations continue (escapes like \\n allowed)"""
    train_corpus: str | None = None
    """training corpus for the memorisation check (ABC file/dir, JSONL, music21)"""
    ngram: int = 10
    """character n-gram length of the near-copy check"""
    overlap_threshold: float = 0.8
    """n-gram overlap at or above which a tune counts as a near copy"""
    music21: bool = True
    """also check that music21 parses each tune"""
    max_new_tokens: int = 512
    """tokens per generation"""
    temperature: float = 0.8
    """sampling temperature (0 = greedy)"""
    top_p: float = 0.9
    """nucleus sampling"""
    top_k: int = 0
    """top-k sampling (0 = off)"""
    repetition_penalty: float = 1.0
    """generation repetition penalty"""
    constrain: str = "none"
    """none | abc | both: generate under the ABC constraint (both: side by side)"""

    def validate(self):
        if not self.abc_file and not self.model:
            raise ArgumentError("give --model (to generate tunes) or --abc_file (to score existing tunes)")
        if not 0.0 <= self.conditioned_share <= 1.0:
            raise ArgumentError("--conditioned_share must be in [0, 1]")
        if not 0.0 < self.overlap_threshold <= 1.0:
            raise ArgumentError("--overlap_threshold must be in (0, 1]")
        if self.n < 0:
            raise ArgumentError("--n must be >= 0")
        if self.constrain not in ("none", "abc", "both"):
            raise ArgumentError(f"--constrain must be none, abc or both, got {self.constrain!r}")
        if self.prompts and self.model:
            read_prompts(self.prompts)  # a bad prompts file is refused before the model loads and generates


def generate_entries(cfg: ABCQualityConfig, loaded, constrain: bool = False, stats: dict | None = None) -> list[dict]:
    """Generated tunes (see the module doc); ``constrain``: under the ABC constraint, each prompt's fields
    from :func:`inference.abc_constraint.extract_fields`; ``stats`` gets tokens, seconds and reports."""
    n_cond = round(cfg.n * cfg.conditioned_share)
    n_unc = cfg.n - n_cond
    gen_kw = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "do_sample": cfg.temperature > 0,
                  "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                  "repetition_penalty": cfg.repetition_penalty, "add_bos": cfg.add_bos, "seed": cfg.seed}
    entries = []
    header = cfg.header.encode("utf-8").decode("unicode_escape")
    stats = {} if stats is None else stats
    if n_unc:
        fields = [extract_fields(header)] * n_unc if constrain else None
        outs = generate(loaded, [header] * n_unc, desc="unconditional", constrain_fields=fields, stats=stats, **gen_kw)
        for o in outs:
            tunes = am.split_tunes(header + o)
            entries.append({"source": "unconditional", "prompt": header, "output": o,
                            "abc": tunes[0] if tunes else None})
    if n_cond:
        specs = read_prompts(cfg.prompts) if cfg.prompts else builtin_prompts(n_cond, cfg.seed)
        specs = [specs[i % len(specs)] for i in range(n_cond)]
        fmt = ChatFormat(loaded.tokenizer)  # the model's chat format, as ids (their BOS included)
        prompts = [fmt.prompt_ids([{"role": "user", "content": s["prompt"]}]) for s in specs]
        fields = [extract_fields(sp["prompt"]) for sp in specs] if constrain else None
        outs = generate(loaded, prompts, desc="conditioned", constrain_fields=fields, stats=stats, **gen_kw)
        for s, o in zip(specs, outs):
            tunes = extract_abc(o)
            entries.append({"source": "conditioned", "prompt": s["prompt"], "key": s.get("key"),
                            "meter": s.get("meter"), "title": s.get("title"), "output": o,
                            "abc": tunes[0] if tunes else None})
    for e, rep in zip(entries, stats.get("reports", [])):
        e["constraint"] = rep
    return entries


def run(cfg: ABCQualityConfig, loaded=None) -> dict:
    t0 = time.time()
    if cfg.abc_file:
        tunes = read_abc_source(cfg.abc_file)
        if not tunes:
            raise ArgumentError(f"{cfg.abc_file}: no ABC tunes found (tunes start at X: lines)")
        if cfg.n and cfg.n < len(tunes):
            tunes = random.Random(cfg.seed).sample(tunes, cfg.n)
        entries = [{"source": "file", "abc": t} for t in tunes]
    else:
        loaded = loaded or load(cfg)
        plan = {"none": [("model", False)], "abc": [("constrained", True)],
                "both": [("model", False), ("constrained", True)]}[cfg.constrain]
        entries, speed = [], {}
        for side, constrained in plan:
            st: dict = {}
            es = generate_entries(cfg, loaded, constrain=constrained, stats=st)
            for e in es:
                e["side"] = side
            entries += es
            speed[side] = {"new_tokens": st.get("new_tokens", 0), "seconds": st.get("seconds", 0.0),
                           "tokens_per_s": st.get("new_tokens", 0) / max(st.get("seconds", 0.0), 1e-9)}
    memo = None
    if cfg.train_corpus:
        memo = am.MemorisationIndex(read_abc_source(cfg.train_corpus), cfg.ngram)
    score_tunes(entries, memo, cfg.overlap_threshold, cfg.music21)
    groups = defaultdict(list)
    sides = defaultdict(list)
    for e in entries:
        groups[(e["side"] + "/" if cfg.constrain == "both" and "side" in e else "") + e["source"]].append(e)
        sides[e.get("side", "all")].append(e)
    if len(sides) > 1:  # side by side: the model alone and constrained
        summary = {k: summarise(v, cfg.music21, memo is not None) for k, v in sides.items()}
    else:
        summary = {"all": summarise(entries, cfg.music21, memo is not None)}
    if len(groups) > 1:
        summary.update({k: summarise(v, cfg.music21, memo is not None) for k, v in groups.items()})
    if not cfg.abc_file:
        only = next(iter(speed)) if len(speed) == 1 else None
        for k, v in summary.items():
            side = k.split("/")[0] if k.split("/")[0] in speed else only
            if side:
                v["tokens_per_s"] = speed[side]["tokens_per_s"]
            members = sides[k] if k in sides else groups.get(k, entries)
            reps = [e["constraint"] for e in members if e.get("constraint")]
            if reps:
                v["constraint_satisfied"] = sum(r["satisfied"] for r in reps) / len(reps)
    result = {
        "benchmark": "abc_quality",
        "source": "file" if cfg.abc_file else "model",
        "summary": summary,
        "train_corpus_size": memo.size if memo else None,
        "generation_speed": None if cfg.abc_file else speed,
        "seconds": time.time() - t0,
        "config": vars(cfg),
        "environment": environment(),
    }
    name = Path(cfg.abc_file).stem if cfg.abc_file else None
    out = Path(cfg.output) if cfg.output else default_output("abc_quality", cfg.model if not name else name,
                                                             None if name else cfg.lora_model)
    result["per_tune"] = str(write_jsonl(out.with_suffix(".jsonl"), entries))
    write_json(out, result)
    result["output"] = str(out)
    return result


_ROWS = [("tunes", "n"), ("ABC found", "abc_extracted"), ("abc2midi parse rate (MIDI, no error)", "parse_rate"),
         ("abc2midi wrote MIDI (errors allowed)", "midi_rate"),
         ("abc2midi clean", "abc2midi_clean"), ("abc2midi warnings only", "abc2midi_warnings"),
         ("abc2midi errors", "abc2midi_errors"), ("music21 parse rate", "music21_parse_rate"),
         ("bar-duration consistency (bars)", "bar_consistency"),
         ("all bars consistent (tunes)", "tunes_all_bars_consistent"), ("repeat structure", "repetition_rate"),
         ("empty bars", "empty_bar_share"), ("distinct bars (of non-empty bars)", "distinct_bar_share"),
         ("tunes repeating one bar > 5 times in a row", "tunes_one_bar_over_5_times"),
         ("exact copies of training tunes", "exact_copy_rate"), ("near copies (n-gram overlap)", "near_copy_rate"),
         ("key compliance", "key_compliance"), ("meter compliance", "meter_compliance"),
         ("title compliance", "title_compliance"),
         ("constraint satisfied", "constraint_satisfied"), ("decode tokens/s", "tokens_per_s")]


def report(result: dict) -> str:
    cols = list(result["summary"])
    rows = []
    for label, key in _ROWS:
        vals = [result["summary"][c].get(key) for c in cols]
        if all(v is None for v in vals):
            continue
        rows.append([label] + ["-" if v is None else (v if isinstance(v, int) else float(v)) for v in vals])
    return markdown_table(["ABC quality"] + cols, rows)


@exit_on_argument_error
def main(argv=None) -> int:
    cfg = parse_config(ABCQualityConfig, argv, __doc__)
    result = run(cfg)
    print(report(result))
    print(f"\nresults: {result['output']}  per tune: {result['per_tune']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
