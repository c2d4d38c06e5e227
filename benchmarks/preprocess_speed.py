"""Preprocessing speed: tunesmith's ``data_preprocess.preprocess`` (pt mode) vs ChatMusician's way, vs the floor.

    python -m benchmarks.preprocess_speed                      # ~20 MB / ~65k unique tunes, -w 1 and -w 2
    python -m benchmarks.preprocess_speed --tokenizers abc2000,llama32k,smollm2-135m --workers 2
    python -m benchmarks.preprocess_speed --variants 2 --workers 1

Paths, each a fresh ``python`` process timed as a whole (start-up, imports, reading, writing), on the
same tunes and the same tokenizer:

``tunesmith``  ``python -m data_preprocess.preprocess -i DIR -o OUT --mode pt -w N``: read the .abc files,
               split, normalise, validate, dedup, hash-split train/val, batch-encode, pack, write shards.
``baseline``   ChatMusician's data_preprocess done well: ``load_dataset("json")`` of one tune per record,
               ``Dataset.map`` tokenising in batches (``batched=True``, ``num_proc`` = the most workers timed),
               no packing, ``save_to_disk``.
``floor``      the fastest thing that does the tokenizer's work: the ``tokenizers`` library alone
               (``Tokenizer.from_file(tokenizer.json).encode_batch_fast``, no transformers, no torch) on the
               same (already split) tunes read from the JSONL, nothing written.

Tokenizers (``--tokenizers``, a comma list; every path of a row uses the same one, as an HF dir with
``tokenizer.json``): ``abc2000`` a 2000-piece BPE trained on music21 (once, into ``work_dir``); ``llama32k``
the LLaMA-style 32k SentencePiece model that ``mistral-common`` ships (converted once); ``smollm2-135m``
SmolLM2-135M's 49k byte-level BPE (the default job's model); or a tokenizer dir / ``.model`` / ``.gguf``.

Corpus: music21's bundled ABC corpus (12,978 tunes) plus ``variants - 1`` deterministic diatonic
transpositions of it (note letters and key shifted, titles marked), written once to ``work_dir`` as
.abc files (for tunesmith) and as JSONL of the same raw tunes (for baseline and floor). Results are
printed (tunes/s, tokens/s, peak RSS, ratios) and written as JSON. Targets: tunesmith >= 2.5x the
baseline's throughput and within 1.5x of the floor's wall time.

This module's top level stays import-light: children import it without torch.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from data_preprocess.corpus import split_text
from data_preprocess.hub import ArgumentError, exit_on_argument_error

REPO = Path(__file__).resolve().parents[1]
_FIELD = re.compile(r"^(?:[A-Za-z]:|%)")
_NOTES = "CDEFGAB"


def _shift_table(v: int) -> dict:
    up = {ord(c): _NOTES[(i + v) % 7] for i, c in enumerate(_NOTES)}
    lo = {ord(c.lower()): _NOTES[(i + v) % 7].lower() for i, c in enumerate(_NOTES)}
    return {**up, **lo}


def variant(tune: str, v: int) -> str:
    """Diatonic shift of every note letter by ``v`` steps (and the K: tonic); title marked. v=0: as is."""
    if v == 0:
        return tune
    tab = _shift_table(v)
    out, in_body = [], False
    for line in tune.split("\n"):
        if line.startswith("T:") and not in_body:
            line += f" (variant {v})"
        elif line.startswith("K:") and len(line) > 2:
            line = "K:" + line[2:].lstrip()[:1].translate(tab) + line[2:].lstrip()[1:]
            in_body = True
        elif in_body and not _FIELD.match(line):
            line = line.translate(tab)
        out.append(line)
    return "\n".join(out)


def build_corpus(work: Path, variants: int) -> tuple[Path, Path, dict]:
    """(dir of .abc files, JSONL of the same raw tunes, info); cached in ``work``."""
    from music21 import corpus as m21

    d = work / f"corpus_v{variants}"
    abc_dir, jsonl = d / "abc", d / "tunes.jsonl"
    info_f = d / "info.json"
    if info_f.is_file():
        return abc_dir, jsonl, json.loads(info_f.read_text())
    abc_dir.mkdir(parents=True, exist_ok=True)
    raw = []
    for p in sorted(m21.getPaths(fileExtensions=("abc",))):
        text = Path(p).read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        raw += [t.rstrip("\n") + "\n" for t in split_text(text)]
    n, nbytes, per_file = 0, 0, 500
    with open(jsonl, "w", encoding="utf-8") as jf:
        for v in range(variants):
            tunes = [variant(t, v) for t in raw]
            for i in range(0, len(tunes), per_file):
                chunk = tunes[i:i + per_file]
                blob = "\n".join(chunk)
                (abc_dir / f"v{v}_{i // per_file:04d}.abc").write_text(blob, encoding="utf-8")
                nbytes += len(blob.encode())
                jf.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in chunk)
            n += len(tunes)
    info = {"tunes": n, "bytes": nbytes, "variants": variants, "files": len(list(abc_dir.glob("*.abc")))}
    info_f.write_text(json.dumps(info))
    return abc_dir, jsonl, info


# --------------------------------------------------------------------------------------------- children

BASELINE = r"""
import json, sys
from datasets import load_dataset
from transformers import AutoTokenizer
tok_dir, jsonl, out, cache, nproc = sys.argv[1:6]
tok = AutoTokenizer.from_pretrained(tok_dir)
ds = load_dataset("json", data_files=jsonl, split="train", cache_dir=cache)
ds = ds.map(lambda ex: tok(ex["text"]), batched=True, num_proc=int(nproc) if int(nproc) > 1 else None,
            remove_columns=["text"])
ds.save_to_disk(out)
"""

FLOOR = r"""
import json, sys
from tokenizers import Tokenizer
tok_dir, jsonl = sys.argv[1:3]
tok = Tokenizer.from_file(tok_dir + "/tokenizer.json")
with open(jsonl, encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for line in f]
enc = tok.encode_batch_fast(texts, add_special_tokens=False)
print(json.dumps({"tunes": len(texts), "tokens": sum(len(e.ids) for e in enc)}))
"""


PREPARE = r"""
import sys
from data_preprocess.preprocess import prepare_tokenizer
prepare_tokenizer(sys.argv[1], sys.argv[2])
"""


def tokenizer_dir(name: str, work: Path, env: dict) -> Path:
    """The benchmark's tokenizer ``name`` as an HF dir with tokenizer.json (made once in ``work/tokenizers``)."""
    if name == "abc2000":
        d = work / "tokenizer"
        if not (d / "tokenizer.json").is_file():
            print(f"training the benchmark tokenizer into {d} (once)")
            subprocess.run([sys.executable, "-m", "data_preprocess.train_tokenizer", "-i", "music21", "-o", str(d),
                            "--vocab_size", "2000", "--overwrite"], cwd=REPO, env=env, check=True, capture_output=True)
        return d
    src = name
    if name == "llama32k":
        import importlib.util

        spec = importlib.util.find_spec("mistral_common")
        if spec is None:
            raise ArgumentError("llama32k: needs the mistral-common package (pip install mistral-common)")
        model = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
        src = str(work / "tokenizers" / "llama32k.model")
        Path(src).parent.mkdir(parents=True, exist_ok=True)
        Path(src).write_bytes(model.read_bytes())
    elif Path(name).expanduser().is_dir() and (Path(name).expanduser() / "tokenizer.json").is_file():
        return Path(name).expanduser()
    d = work / "tokenizers" / re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name)
    if not (d / "tokenizer.json").is_file():
        print(f"preparing tokenizer {name} into {d} (once)")
        subprocess.run([sys.executable, "-c", PREPARE, src, str(d)], cwd=REPO, env=env, check=True)
    return d


# Runs the timed command and reports its wall time and peak RSS. Why a shim: Linux carries a process's peak RSS
# across fork + exec, so a child of this (torch-importing, dataset-loading) parent would report at least the
# parent's RSS; the shim is a small fresh process, and its children start from its own few MB.
SHIM = r"""
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "maxrss_kb": ru.ru_maxrss}, f)
"""


def timed_rss(argv: list[str], env: dict) -> dict:
    """Runs one child: wall time of the whole process and its peak RSS (``os.wait4`` rusage: the largest of the
    process and its workers), measured by :data:`SHIM`."""
    import tempfile

    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe, tempfile.TemporaryDirectory() as td:
        rep = Path(td) / "rusage.json"
        rc = subprocess.run([sys.executable, "-c", SHIM, str(rep), *argv], cwd=REPO, env=env, stdout=fo, stderr=fe,
                            check=False).returncode
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
        r = json.loads(rep.read_text()) if rep.is_file() else {"rc": rc}
    if rc != 0 or r["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} failed (rc={r['rc']}):\n{err[-3000:]}")
    return {"wall_s": r["wall_s"], "peak_rss_mb": r["maxrss_kb"] / 1024, "stdout": out}


# --------------------------------------------------------------------------------------------- main


@dataclass
class Config:
    work_dir: str = "outputs/bench_preprocess"
    """corpus cache, tokenizer and run outputs"""
    tokenizers: str = "abc2000"
    """comma list: abc2000 (a 2000-piece BPE trained on music21), llama32k (mistral-common's 32k SentencePiece),
    smollm2-135m, or tokenizer paths"""
    variants: int = 5
    """music21 copies: the original + variants-1 transpositions (5 = ~65k tunes)"""
    workers: str = "1,2"
    """comma list of -w values to time for tunesmith"""
    max_len: int = 2048
    """block length"""
    repeats: int = 1
    """runs per path (best wall time kept); paths interleave"""
    output: str | None = None
    """result JSON (default outputs/benchmarks/preprocess_speed.json)"""


def run_paths(cfg: Config, runs_dir: Path, tok_dir: Path, abc_dir: Path, jsonl: Path, workers: list[int],
              env: dict) -> dict:
    """Times every path with one tokenizer; ``{tokenizer, results, verdict}`` (and prints their table)."""
    from benchmarks.common import markdown_table

    paths = {f"tunesmith -w {w}": w for w in workers}
    paths["baseline (datasets.map)"] = "baseline"
    paths["floor (batch encode)"] = "floor"
    best: dict[str, dict] = {}
    for rep in range(cfg.repeats):
        for name, what in paths.items():
            out = runs_dir / name.split()[0] / f"{what}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            if what == "baseline":
                argv = [sys.executable, "-c", BASELINE, str(tok_dir), str(jsonl), str(out / "ds"), str(out / "cache"),
                        str(max(workers))]
            elif what == "floor":
                argv = [sys.executable, "-c", FLOOR, str(tok_dir), str(jsonl)]
            else:
                argv = [sys.executable, "-m", "data_preprocess.preprocess", "-t", str(tok_dir), "-i", str(abc_dir),
                        "-o", str(out), "--mode", "pt", "--max_len", str(cfg.max_len), "-w", str(what),
                        "--no_progress", "--overwrite"]
            r = timed_rss(argv, env)
            if what == "floor":
                r.update(json.loads(r["stdout"].strip().splitlines()[-1]))
            elif what == "baseline":
                import datasets

                ds = datasets.load_from_disk(str(out / "ds"))
                r["tunes"] = len(ds)
                r["tokens"] = int(sum(len(x) for x in ds.with_format("arrow")["input_ids"].to_pylist()))
            else:
                meta = json.loads((out / "meta.json").read_text())
                r["tunes"] = meta["counts"]["tunes_read"]
                r["tokens"] = meta["counts"]["tokens"]
                r["kept"] = meta["counts"]["kept"]
                r["duplicates"] = meta["counts"]["duplicates"]
                r["rejected"] = meta["counts"]["rejected_total"]
                r["packing_efficiency"] = meta["counts"]["packing_efficiency"]
            r.pop("stdout", None)
            print(f"  [{rep + 1}/{cfg.repeats}] {name}: {r['wall_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
            if name not in best or r["wall_s"] < best[name]["wall_s"]:
                best[name] = r
    for r in best.values():
        r["tunes_per_s"] = r["tunes"] / r["wall_s"]
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
    base, floor = best["baseline (datasets.map)"], best["floor (batch encode)"]
    rows = []
    for name, r in best.items():
        r["speedup_vs_baseline"] = (r["tunes_per_s"] / base["tunes_per_s"])
        r["time_vs_floor"] = r["wall_s"] / floor["wall_s"]
        rows.append([name, f"{r['wall_s']:.2f}", f"{r['tunes_per_s']:.0f}", f"{r['tokens_per_s'] / 1e6:.2f} M",
                     f"{r['peak_rss_mb']:.0f}", f"{r['speedup_vs_baseline']:.2f}x", f"{r['time_vs_floor']:.2f}x"])
    print()
    print(markdown_table(["path", "wall s", "tunes/s", "tokens/s", "peak RSS MB", "vs baseline (throughput)",
                          "vs floor (time)"], rows))
    ours = {k: v for k, v in best.items() if k.startswith("tunesmith")}
    top = min(ours, key=lambda k: ours[k]["wall_s"])
    verdict = {"best_tunesmith": top, "speedup_vs_baseline": ours[top]["speedup_vs_baseline"],
               "time_vs_floor": ours[top]["time_vs_floor"],
               "floor_speedup_vs_baseline": floor["speedup_vs_baseline"],
               "target_speedup_met": ours[top]["speedup_vs_baseline"] >= 2.5,
               "target_floor_met": ours[top]["time_vs_floor"] <= 1.5}
    print(f"\n{top}: {verdict['speedup_vs_baseline']:.2f}x the baseline's throughput (target >= 2.5x: "
          f"{'met' if verdict['target_speedup_met'] else 'NOT met'}; the floor itself is "
          f"{verdict['floor_speedup_vs_baseline']:.2f}x), {verdict['time_vs_floor']:.2f}x the floor's "
          f"time (target <= 1.5x: {'met' if verdict['target_floor_met'] else 'NOT met'})")
    return {"tokenizer": str(tok_dir), "results": best, "verdict": verdict}


@exit_on_argument_error
def main(argv=None) -> int:
    from benchmarks.common import environment, markdown_table, parse_config, write_json  # (here: torch)

    cfg = parse_config(Config, argv, description=__doc__)
    work = (REPO / cfg.work_dir) if not Path(cfg.work_dir).is_absolute() else Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)       # every path gets the tokenizer's default threading
    abc_dir, jsonl, info = build_corpus(work, cfg.variants)
    print(f"corpus: {info['tunes']} tunes, {info['bytes'] / 1e6:.1f} MB in {info['files']} files ({abc_dir}); "
          f"cpus: {os.cpu_count()}, load avg: {os.getloadavg()[0]:.2f}")
    try:
        workers = [int(w) for w in str(cfg.workers).split(",") if w.strip()]
    except ValueError:
        raise ArgumentError(f"--workers {cfg.workers!r}: expected a comma list of worker counts, e.g. 1,2") from None
    if not workers or min(workers) < 1:
        raise ArgumentError(f"--workers {cfg.workers!r}: expected a comma list of worker counts >= 1, e.g. 1,2")
    runs = {}
    for tok_name in [t.strip() for t in cfg.tokenizers.split(",") if t.strip()]:
        tok_dir = tokenizer_dir(tok_name, work, env)
        print(f"tokenizer {tok_name}: {tok_dir}")
        runs[tok_name] = run_paths(cfg, work / "runs" / re.sub(r"[^A-Za-z0-9_.-]+", "_", tok_name), tok_dir, abc_dir,
                                   jsonl, workers, env)
    if len(runs) > 1:
        print("\nsummary (best tunesmith -w of each tokenizer):\n")
        print(markdown_table(["tokenizer", "tunesmith", "baseline", "floor", "vs baseline", "vs floor",
                              "floor vs baseline"],
                             [[t, f"{r['results'][r['verdict']['best_tunesmith']]['wall_s']:.2f} s",
                               f"{r['results']['baseline (datasets.map)']['wall_s']:.2f} s",
                               f"{r['results']['floor (batch encode)']['wall_s']:.2f} s",
                               f"{r['verdict']['speedup_vs_baseline']:.2f}x", f"{r['verdict']['time_vs_floor']:.2f}x",
                               f"{r['results']['floor (batch encode)']['speedup_vs_baseline']:.2f}x"]
                              for t, r in runs.items()]))
    result = {"config": asdict(cfg), "corpus": info, "runs": runs,
              "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "environment": environment()}
    path = write_json(cfg.output or REPO / "outputs" / "benchmarks" / "preprocess_speed.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
