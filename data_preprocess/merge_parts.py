"""Join the parts of a sharded preprocessing run into one shard dir that training reads like any other.

    # on N machines (a Slurm job array, any scheduler): part i of N, each reading the whole input
    python -m data_preprocess.preprocess -t TOK -i CORPUS -o parts/pt-$i --num_shards N --shard_index $i
    # then, once, where all parts are visible
    python -m data_preprocess.merge_parts -o data/pt parts/pt-*

A tune (or record) belongs to one part by a hash of its dedup key (``corpus.part_of``), so duplicates meet in
one part and deduplicating each part deduplicates the corpus; its train/val split is the same hash-based
split as a one-machine run. The merge checks that the parts come from one job (same tokenizer, mode, max_len,
input, split settings and N) and that every index 0..N-1 is there exactly once, then concatenates each
split's blocks in part order and sums the counts. Only a tiny corpus behaves differently from one machine:
the fallback that moves one tune to an empty val split is not applied (the merge warns instead).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

from data_preprocess.hub import ArgumentError, exit_on_argument_error
from data_preprocess.shards import SPLITS, read_meta, write_meta

# what must agree between the parts of one job (config keys; the tokenizer is compared by identity)
_SAME_CONFIG = ("mode", "max_len", "input", "val_ratio", "seed", "text_field", "dedup", "check",
                "make_sft_from_metadata", "music2text_fraction", "num_shards", "limit")
_SUMMED = ("files", "empty_files", "bytes_read", "tunes_read", "kept", "duplicates", "replaced_chars",
           "recoded_cp1252", "sequences", "tokens", "target_tokens", "blocks", "rejected_total")


def _read_part(p: Path) -> dict:
    try:
        meta = read_meta(p)
    except (FileNotFoundError, ValueError) as e:
        raise ArgumentError(f"{p}: not a preprocess part ({e})") from None
    if not meta.get("part"):
        raise ArgumentError(f"{p}: was not written with --num_shards/--shard_index; it is a whole dataset already "
                            "(train on it directly)")
    return meta


def merge_parts(parts: list[str], out: str, overwrite: bool = False) -> dict:
    """Merges the part dirs into ``out``; returns the merged meta (also written to OUT/meta.json)."""
    if not parts:
        raise ArgumentError("no parts given. Fix: python -m data_preprocess.merge_parts -o OUT PART [PART ...]")
    dirs = [Path(p) for p in parts]
    metas = [_read_part(d) for d in dirs]
    o = Path(out)
    for d in dirs:
        if d.resolve().is_relative_to(o.resolve()):
            raise ArgumentError(f"-o {out} is or holds the part {d}: merging would overwrite it. Fix: another -o")
    if o.exists() and any(o.iterdir()) and not (o / "meta.json").is_file() and not overwrite:
        raise ArgumentError(f"-o {out}: exists, is not empty and holds no previous output. Fix: --overwrite or "
                            "another -o")
    first = metas[0]
    for d, m in zip(dirs[1:], metas[1:]):
        for k in _SAME_CONFIG:
            if m["config"].get(k) != first["config"].get(k):
                raise ArgumentError(f"{d}: {k}={m['config'].get(k)!r} but {dirs[0]}: {k}={first['config'].get(k)!r}; "
                                    "parts of one dataset come from one preprocess command. Fix: re-run that part")
        a = {k: v for k, v in m["tokenizer"].items() if k not in ("source", "path")}  # (each part's own copy)
        b = {k: v for k, v in first["tokenizer"].items() if k not in ("source", "path")}
        if a != b:
            raise ArgumentError(f"{d}: its tokenizer differs from {dirs[0]}'s; parts must share one tokenizer. "
                                "Fix: re-run that part with the same -t")
    n = first["part"]["of"]
    seen = Counter(m["part"]["index"] for m in metas)
    twice = sorted(i for i, c in seen.items() if c > 1)
    missing = sorted(set(range(n)) - set(seen))
    if twice:
        raise ArgumentError(f"part(s) {twice} of {n} given more than once; each of 0..{n - 1} exactly once")
    if missing:
        raise ArgumentError(f"part(s) {missing} of {n} missing: run preprocess --num_shards {n} --shard_index I "
                            "for each, then merge all of them")
    order = sorted(range(len(dirs)), key=lambda j: metas[j]["part"]["index"])
    o.mkdir(parents=True, exist_ok=True)
    splits = {}
    for s in SPLITS:
        for name in ("tokens", "loss_mask", "pos"):
            tmp = o / f"{s}.{name}.bin.partial"
            with open(tmp, "wb") as w:
                for j in order:
                    with open(dirs[j] / f"{s}.{name}.bin", "rb") as r:
                        shutil.copyfileobj(r, w, 1 << 20)
            tmp.replace(o / f"{s}.{name}.bin")
        st = [metas[j]["splits"][s] for j in order]
        splits[s] = {k: sum(x[k] for x in st) for k in ("num_blocks", "num_docs", "num_tokens", "num_target_tokens",
                                                         "num_padding_tokens", "num_split_docs")}
        total = splits[s]["num_blocks"] * first["max_len"]
        splits[s]["packing_efficiency"] = splits[s]["num_tokens"] / total if total else 0.0
    counts = {k: sum(m["counts"].get(k, 0) for m in metas) for k in _SUMMED}
    rejected = Counter()
    for m in metas:
        rejected.update(m["counts"].get("rejected", {}))
    counts.update(rejected=dict(sorted(rejected.items())), split_sizes={s: splits[s]["num_docs"] for s in SPLITS},
                  longest_sequence_tokens=max(m["counts"]["longest_sequence_tokens"] for m in metas),
                  packing_efficiency=counts["tokens"] / (counts["blocks"] * first["max_len"]) if counts["blocks"] else 0.0,
                  per_part=[{"index": metas[j]["part"]["index"], **{k: metas[j]["counts"].get(k, 0) for k in
                                                                     ("kept", "duplicates", "sequences", "tokens")}}
                            for j in order])
    if first["mode"] == "sft":
        counts["sft"] = dict(sum((Counter(m["counts"].get("sft", {})) for m in metas), Counter()))
    if (o / "tokenizer").exists():
        shutil.rmtree(o / "tokenizer")
    shutil.copytree(dirs[order[0]] / "tokenizer", o / "tokenizer")
    keep = ("mode", "max_len", "vocab_size", "pad_id", "bos_id", "eos_id", "tokenizer", "input", "sft_format",
            "config", "versions")
    meta = {k: first[k] for k in keep if k in first}
    meta.update(splits=splits, counts=counts, part=None, merged_from=[str(dirs[j]) for j in order],
                tokenizer={**first["tokenizer"], "path": str(o / "tokenizer")})
    write_meta(o, meta)
    if not splits["val"]["num_docs"] and first["config"].get("val_ratio", 0) > 0:
        print("warning: the merged val split is empty (too few tunes for --val_ratio); training needs one. Fix: "
              "preprocess more tunes or raise --val_ratio", file=sys.stderr)
    return read_meta(o)


@exit_on_argument_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_preprocess.merge_parts", description=__doc__.split("\n")[0])
    ap.add_argument("parts", nargs="+", help="the part dirs (preprocess -o of each --shard_index)")
    ap.add_argument("-o", "--output_dir", required=True)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    meta = merge_parts(a.parts, a.output_dir, a.overwrite)
    c = meta["counts"]
    print(f"merged {len(a.parts)} parts into {a.output_dir}: {c['kept']} tunes/records kept, {c['sequences']} "
          f"sequences, {c['tokens']} tokens; train {c['split_sizes']['train']} / val {c['split_sizes']['val']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
