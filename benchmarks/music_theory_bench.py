"""MusicTheoryBench (ChatMusician, Yuan et al. 2024): 372 four-option music theory questions,
``knowledge`` and ``reasoning``, evaluated standalone with option-rotation averaging.

    python -m benchmarks.music_theory_bench --model M [--lora_model L] --data D --mode ppl|gen \
        --shots 0|5 [--permutations K]

Data ``D``: the hub id ``m-a-p/MusicTheoryBench`` (needs the HF cache or network) or a local
parquet / JSON / JSONL file, or a directory of them (e.g. a ``snapshot_download`` of the dataset), with
fields ``id, instruction, stem, options{A,B,C,D}, subject (knowledge|reasoning), answer (letter),
split (dev|test), abc_score, analysis``.

Prompt (the one of ChatMusician's OpenCompass config, so zero-/five-shot figures are comparable)::

    {instruction}
    [k dev exemplars, each: {question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n]
    {question}
    A. ...
    B. ...
    C. ...
    D. ...
    Answer:

where ``question`` is the stem, followed on a new line by ``abc_score`` when that is non-empty. The
five exemplars are the first five ``dev`` records (both subjects, as in ChatMusician).

Modes:
* ``ppl``: each option is scored by the log-likelihood of its continuation after ``Answer:`` --
  the letter (`` A``; default, = OpenCompass' PPL mode) or the option text (``--ppl_target text``).
  Reported under three normalisations: ``sum`` (total log-prob), ``mean_token`` (per token) and
  ``mean_byte`` (per UTF-8 byte, lm-eval's acc_norm). For one-token letters they coincide.
* ``gen``: greedy decoding, then the answer letter is extracted from the reply; replies with no
  unambiguous letter count as wrong and are listed in the result file.

``--permutations K`` evaluates K cyclic rotations of the options (rotation r puts the option that was
at position (j + r) mod 4 at letter j and moves the answer letter with it); the figures are mean ± std
over rotations. The model's position bias therefore cannot inflate (or deflate) the score.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    ModelArgs,
    default_output,
    environment,
    generate,
    load,
    loglikelihood,
    markdown_table,
    mean_std,
    parse_config,
    write_json,
    write_jsonl,
)
from data_preprocess.chat_format import ChatFormat
from data_preprocess.hub import ArgumentError, exit_on_argument_error

HUB_ID = "m-a-p/MusicTheoryBench"
LETTERS = "ABCD"
SUBJECTS = ("knowledge", "reasoning")
DEFAULT_INSTRUCTION = ("Read the following questions from the four options (A, B, C and D) given in each "
                       "question. Choose the best option.")
_STEM_BOILERPLATE = "Use the example below to answer the question that follows."
NORMS = ("sum", "mean_token", "mean_byte")


@dataclass
class Item:
    id: str
    instruction: str
    stem: str
    options: dict[str, str]
    subject: str
    answer: str
    split: str
    abc_score: str = ""
    analysis: str = ""

    @property
    def question(self) -> str:
        """The stem, plus the ABC score on a new line when there is one (ChatMusician's convert_dataset)."""
        if self.abc_score:
            return self.stem.replace(_STEM_BOILERPLATE, "").strip() + "\n" + self.abc_score
        return self.stem


# ---------------------------------------------------------------------------------------------- data


def _is_empty(v) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):  # NaN from pandas
        return True
    return isinstance(v, str) and not v.strip()


def parse_record(r: dict, where: str, split_hint: str | None = None) -> Item:
    """Validates one record of the MusicTheoryBench schema; errors name the record and field."""
    def need(field):
        if field not in r or _is_empty(r[field]):
            raise ValueError(f"{where}: missing field '{field}' (MusicTheoryBench schema: id, instruction, stem, "
                             f"options{{A,B,C,D}}, subject, answer, split, abc_score, analysis)")
        return r[field]

    opts = need("options")
    if isinstance(opts, str):
        try:
            opts = json.loads(opts)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: field 'options' is a string but not JSON: {opts[:60]!r}") from None
    if isinstance(opts, (list, tuple)):
        opts = dict(zip(LETTERS, opts))
    if not isinstance(opts, dict) or sorted(opts) != list(LETTERS):
        raise ValueError(f"{where}: field 'options' must map exactly A, B, C, D to texts, got {opts!r:.80}")
    answer = str(need("answer")).strip().strip("()").upper()
    if answer not in LETTERS:
        raise ValueError(f"{where}: field 'answer' must be one of A-D, got {r['answer']!r}")
    subject = str(need("subject")).strip().lower()
    if subject not in SUBJECTS:
        raise ValueError(f"{where}: field 'subject' must be 'knowledge' or 'reasoning', got {r['subject']!r}")
    split = r.get("split") if not _is_empty(r.get("split")) else split_hint
    if split not in ("dev", "test"):
        raise ValueError(f"{where}: field 'split' must be 'dev' or 'test', got {r.get('split')!r}")
    abc = r.get("abc_score")
    return Item(id=str(r.get("id", where)), instruction=str(r.get("instruction") or DEFAULT_INSTRUCTION).strip(),
                stem=str(need("stem")), options={k: str(opts[k]) for k in LETTERS}, subject=subject,
                answer=answer, split=split, abc_score="" if _is_empty(abc) else str(abc).strip(),
                analysis="" if _is_empty(r.get("analysis")) else str(r["analysis"]))


def _split_from_name(p: Path) -> str | None:
    name = p.name.lower()
    return "dev" if name.startswith(("dev", "validation")) else "test" if name.startswith("test") else None


def _read_file(p: Path) -> list[tuple[dict, str, str | None]]:
    """(record, where, split hint) of every record in one parquet/JSON/JSONL file."""
    hint = _split_from_name(p)
    suf = p.suffix.lower()
    if suf == ".parquet":
        import pandas as pd

        df = pd.read_parquet(p)
        return [(r, f"{p} row {i}", hint) for i, r in enumerate(df.to_dict(orient="records"))]
    if suf == ".jsonl":
        out = []
        for ln, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append((json.loads(line), f"{p}:{ln}", hint))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{ln}: not valid JSON ({e.msg}); one record per line expected") from None
        return out
    if suf == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict) and any(k in data for k in ("dev", "test")):  # {"dev": [...], "test": [...]}
            return [(r, f"{p} {s}[{i}]", s) for s in ("dev", "test") for i, r in enumerate(data.get(s, []))]
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a list of records, {{'dev': [...], 'test': [...]}} or {{'data': [...]}}")
        return [(r, f"{p}[{i}]", hint) for i, r in enumerate(data)]
    raise ValueError(f"{p}: unsupported file type; use .parquet, .json or .jsonl")


def load_items(source: str) -> list[Item]:
    """All records (dev and test) of ``source``: a file, a directory of files, or a hub id."""
    p = Path(source)
    raw: list[tuple[dict, str, str | None]] = []
    if p.is_file():
        raw = _read_file(p)
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in (".parquet", ".jsonl", ".json")
                       and not f.name.startswith(".") and f.name not in ("dataset_info.json", "dataset_dict.json",
                                                                          "state.json"))
        if not files:
            raise ArgumentError(f"{p}: no .parquet/.json/.jsonl files found")
        for f in files:
            raw += _read_file(f)
    else:
        if source.count("/") != 1:
            raise ArgumentError(f"{source}: no such file or directory (and not a hub id like {HUB_ID})")
        try:
            import datasets

            dd = datasets.load_dataset(source)
        except Exception as e:  # noqa: BLE001 - offline, gated, not cached ... all become one clear line
            raise ArgumentError(f"{source}: could not load from the HF hub/cache ({type(e).__name__}: {e}); "
                             f"download it where there is network (huggingface-cli download --repo-type "
                             f"dataset {source} --local-dir DIR) and pass --data DIR") from None
        for split, ds in dd.items():
            raw += [(dict(r), f"{source}:{split}[{i}]", split) for i, r in enumerate(ds)]
    items = [parse_record(r, where, hint) for r, where, hint in raw]
    if not any(it.split == "test" for it in items):
        raise ArgumentError(f"{source}: no records with split 'test'")
    return items


# ------------------------------------------------------------------------------------------- prompts


def rotate(item: Item, r: int) -> Item:
    """Cyclic rotation r of the options: letter j now shows the option formerly at (j + r) mod 4; the
    answer letter follows its option."""
    n = len(LETTERS)
    opts = {LETTERS[j]: item.options[LETTERS[(j + r) % n]] for j in range(n)}
    ans = LETTERS[(LETTERS.index(item.answer) - r) % n]
    return Item(item.id, item.instruction, item.stem, opts, item.subject, ans, item.split, item.abc_score,
                item.analysis)


def format_question(item: Item, with_answer: bool) -> str:
    s = item.question + "".join(f"\n{k}. {item.options[k]}" for k in LETTERS) + "\nAnswer:"
    return s + (f" {item.answer}\n" if with_answer else "")


def build_prompt(item: Item, shots: list[Item]) -> str:
    return item.instruction + "\n" + "".join(format_question(s, True) for s in shots) + format_question(item, False)


_ANSWER_PATTERNS = [
    # "Answer: B", "the answer is (C)", "correct answer is option D", "Answer - A."
    re.compile(r"answer\s*(?:is|:|-|would be|should be)?\s*(?:option|choice)?\s*[\(\[*]*([A-D])(?![A-Za-z])", re.IGNORECASE),
    # the reply starts with the letter and punctuation: "B", "B.", "(C) fifth", "D: ..." (not "A major ...")
    re.compile(r"^\s*[\(\[*]*([A-D])(?:[\)\]*.:,]|\s*$)"),
    # "option C", "choice (A)"
    re.compile(r"(?:option|choice)\s*[\(\[]?([A-D])(?![A-Za-z])", re.IGNORECASE),
    # a bold or bracketed letter: "**B**", "(D)"
    re.compile(r"(?:\*\*|\()([A-D])(?:\*\*|\))"),
]


def extract_letter(reply: str, options: dict[str, str] | None = None) -> str | None:
    """The answer letter of a free-form reply, or None when there is no unambiguous one.

    Tries, in order: an explicit "answer ... X", a leading letter, "option X", a bold/bracketed letter;
    the first pattern that matches decides, and it must match only one distinct letter. Failing all,
    a reply that quotes exactly one option's text picks that option.
    """
    text = reply.strip()
    for pat in _ANSWER_PATTERNS:
        found = {m.group(1).upper() for m in pat.finditer(text)}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return None
    if options:
        low = text.lower()
        hits = [k for k, v in options.items() if v.strip() and v.strip().lower() in low]
        if len(hits) == 1:
            return hits[0]
    return None


# ----------------------------------------------------------------------------------------------- run


@dataclass
class MTBConfig(ModelArgs):
    data: str = HUB_ID
    """hub id, or a local parquet/JSON/JSONL file or dir of them"""
    mode: str = "ppl"
    """ppl (log-likelihood of each option) | gen (greedy reply + letter extraction)"""
    shots: int = 0
    """number of dev exemplars in the prompt (0 or 5 in ChatMusician's table)"""
    permutations: int = 1
    """number of cyclic option rotations to average over (1-4)"""
    ppl_target: str = "letter"
    """ppl mode: score ' X' letters (OpenCompass) or the option 'text'"""
    split: str = "test"
    """which split to evaluate: test | dev"""
    subject: str | None = None
    """only this subject (knowledge | reasoning)"""
    limit: int | None = None
    """at most this many questions (quick runs)"""
    max_new_tokens: int = 64
    """gen mode: reply length"""
    chat: bool = False
    """gen mode: wrap the prompt in the model's chat format (the tokenizer's chat template, else ChatMusician's;
    SFT models)"""

    def validate(self):
        if self.mode not in ("ppl", "gen"):
            raise ArgumentError(f"--mode must be ppl or gen, got {self.mode!r}")
        if self.ppl_target not in ("letter", "text"):
            raise ArgumentError(f"--ppl_target must be letter or text, got {self.ppl_target!r}")
        if not 1 <= self.permutations <= len(LETTERS):
            raise ArgumentError(f"--permutations must be 1..{len(LETTERS)} (cyclic rotations of 4 options)")
        if self.shots < 0:
            raise ArgumentError("--shots must be >= 0")
        if self.split not in ("test", "dev"):
            raise ArgumentError(f"--split must be test or dev, got {self.split!r}")
        if self.subject is not None and self.subject not in SUBJECTS:
            raise ArgumentError(f"--subject must be one of {SUBJECTS}")


def _ppl_predictions(loaded, cfg: MTBConfig, prompts: list[str], items: list[Item]) -> list[dict]:
    conts = []
    for it in items:
        for k in LETTERS:
            conts.append(f" {k}" if cfg.ppl_target == "letter" else f" {it.options[k]}")
    pairs = [(p, conts[4 * i + j]) for i, p in enumerate(prompts) for j in range(4)]
    scores = loglikelihood(loaded, pairs, cfg.batch_size, cfg.max_length, cfg.add_bos, desc="MusicTheoryBench ppl")
    out = []
    for i, it in enumerate(items):
        s = scores[4 * i: 4 * i + 4]
        by = {"sum": [x.logprob for x in s],
              "mean_token": [x.logprob / x.n_tokens for x in s],
              "mean_byte": [x.logprob / max(1, len(conts[4 * i + j].encode("utf-8"))) for j, x in enumerate(s)]}
        preds = {n: LETTERS[max(range(4), key=lambda j: v[j])] for n, v in by.items()}
        out.append({"pred": preds, "logprob": by["sum"], "n_tokens": [x.n_tokens for x in s]})
    return out


def _gen_predictions(loaded, cfg: MTBConfig, prompts: list[str], items: list[Item]) -> list[dict]:
    tok = loaded.tokenizer
    if cfg.chat:  # ids of the chat prompt, exactly as SFT trained on them (BOS from the template, not add_bos)
        fmt = ChatFormat(tok)
        prompts = [fmt.prompt_ids([{"role": "user", "content": p}]) for p in prompts]
    replies = generate(loaded, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                       do_sample=False, add_bos=cfg.add_bos, desc="MusicTheoryBench gen")
    return [{"pred": {"gen": extract_letter(r, it.options)}, "reply": r} for r, it in zip(replies, items)]


def run(cfg: MTBConfig, loaded=None) -> dict:
    try:
        items = load_items(cfg.data)
    except ValueError as e:  # names the file, line and field: one line, no traceback
        raise ArgumentError(str(e)) from None
    dev = [it for it in items if it.split == "dev"]
    evals = [it for it in items if it.split == cfg.split and (cfg.subject is None or it.subject == cfg.subject)]
    if cfg.limit:
        evals = evals[: cfg.limit]
    if cfg.shots > len(dev):
        raise ArgumentError(f"{cfg.data}: {cfg.shots} shots requested but only {len(dev)} dev records")
    shots = dev[: cfg.shots]
    if cfg.split == "dev" and shots:
        shot_ids = {s.id for s in shots}
        evals = [it for it in evals if it.id not in shot_ids]  # never ask an exemplar
    if not evals:
        raise ArgumentError(f"{cfg.data}: nothing to evaluate (split={cfg.split}, subject={cfg.subject})")
    loaded = loaded or load(cfg)

    rotated = [(r, rotate(it, r)) for r in range(cfg.permutations) for it in evals]
    prompts = [build_prompt(it, shots) for _, it in rotated]
    t0 = time.time()
    preds = (_ppl_predictions if cfg.mode == "ppl" else _gen_predictions)(loaded, cfg, prompts, [it for _, it in rotated])
    elapsed = time.time() - t0
    norms = NORMS if cfg.mode == "ppl" else ("gen",)

    records, unparseable = [], []
    # correct[norm][rotation][subject] -> list of 0/1
    correct = {n: defaultdict(lambda: defaultdict(list)) for n in norms}
    for (r, it), orig, p in zip(rotated, [e for _ in range(cfg.permutations) for e in evals], preds):
        rec = {"id": it.id, "subject": it.subject, "rotation": r, "answer": it.answer,
               "original_answer": orig.answer, **p}
        rec["correct"] = {n: p["pred"][n] == it.answer for n in norms}
        for n in norms:
            correct[n][r][it.subject].append(int(rec["correct"][n]))
        if cfg.mode == "gen" and p["pred"]["gen"] is None:
            unparseable.append({"id": it.id, "rotation": r, "reply": p["reply"][:300]})
        records.append(rec)

    def acc(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    scores = {}
    for n in norms:
        per_rot = {"overall": [], **{s: [] for s in SUBJECTS}}
        for r in range(cfg.permutations):
            bysub = correct[n][r]
            per_rot["overall"].append(acc([c for v in bysub.values() for c in v]))
            for s in SUBJECTS:
                if bysub.get(s):
                    per_rot[s].append(acc(bysub[s]))
        scores[n] = {k: {"mean": mean_std(v)[0], "std": mean_std(v)[1], "per_rotation": v}
                     for k, v in per_rot.items() if v}
    counts = {s: sum(1 for it in evals if it.subject == s) for s in SUBJECTS}
    primary = "sum" if cfg.mode == "ppl" else "gen"
    result = {
        "benchmark": "music_theory_bench",
        "mode": cfg.mode,
        "normalisations": list(norms),
        "primary": primary,
        "ppl_target": cfg.ppl_target if cfg.mode == "ppl" else None,
        "shots": cfg.shots,
        "permutations": cfg.permutations,
        "n_questions": len(evals),
        "n_per_subject": counts,
        "scores": scores,
        "unparseable": unparseable,
        "n_unparseable": len(unparseable),
        "chance": 0.25,
        "seconds": elapsed,
        "config": vars(cfg),
        "environment": environment(),
    }
    out = Path(cfg.output) if cfg.output else default_output(
        "music_theory_bench", cfg.model, cfg.lora_model, f"_{cfg.mode}_{cfg.shots}shot")
    result["per_question"] = str(write_jsonl(out.with_suffix(".jsonl"), records))
    write_json(out, result)
    result["output"] = str(out)
    return result


def report(result: dict) -> str:
    rows = []
    for n in result["normalisations"]:
        sc = result["scores"][n]
        row = [f"{result['mode']} ({n})"]
        for k in ("knowledge", "reasoning", "overall"):
            row.append(f"{100 * sc[k]['mean']:.1f} ± {100 * sc[k]['std']:.1f}" if k in sc else "-")
        rows.append(row)
    title = (f"MusicTheoryBench {result['shots']}-shot, {result['permutations']} rotation(s), "
             f"n={result['n_questions']}")
    table = markdown_table([title, "knowledge", "reasoning", "overall"], rows)
    if result["mode"] == "gen":
        table += f"\n\nunparseable replies (counted wrong): {result['n_unparseable']}"
    return table


@exit_on_argument_error
def main(argv=None) -> int:
    cfg = parse_config(MTBConfig, argv, __doc__)
    result = run(cfg)
    print(report(result))
    print(f"\nresults: {result['output']}  per question: {result['per_question']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
