"""MMLU (Hendrycks et al. 2021), k-shot, scored by the log-likelihood of the answer letter.

    python -m benchmarks.mmlu --model M [--lora_model L] --data_dir DIR --shots 5 [--limit N]

The prompt is the original / lm-evaluation-harness one::

    The following are multiple choice questions (with answers) about abstract algebra.

    {dev question 1}
    A. ...
    B. ...
    C. ...
    D. ...
    Answer: B

    ... (k dev exemplars) ...

    {test question}
    A. ...
    ...
    Answer:

and the prediction is the letter whose continuation (" A" ... " D") has the highest log-probability,
so figures are comparable with lm-eval-harness' ``mmlu`` task and with the LLaMA-2 / ChatMusician
papers. ``DIR`` holds ``dev/{subject}_dev.csv`` and ``test/{subject}_test.csv`` in either layout:
the original headerless CSV (question, A, B, C, D, letter) or a header ``question,choice0..3,answer``
with an integer answer 0-3. Results: per-subject accuracy, the four categories, micro (over questions)
and macro (over subjects) averages.
"""
from __future__ import annotations

import csv
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    ModelArgs,
    default_output,
    environment,
    load,
    loglikelihood,
    markdown_table,
    opt,
    parse_config,
    write_json,
    write_jsonl,
)
from training.hf_io import exit_on_model_path_error

LETTERS = "ABCD"

# subject -> subcategory, and subcategory -> category: the map of the original release (categories.py)
SUBCATEGORY = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}
CATEGORIES = {
    "STEM": ["physics", "chemistry", "biology", "computer science", "math", "engineering"],
    "humanities": ["history", "philosophy", "law"],
    "social sciences": ["politics", "culture", "economics", "geography", "psychology"],
    "other": ["other", "business", "health"],
}
CATEGORY_OF_SUB = {sub: cat for cat, subs in CATEGORIES.items() for sub in subs}


def category(subject: str) -> str:
    return CATEGORY_OF_SUB[SUBCATEGORY.get(subject, "other")]


@dataclass
class Question:
    subject: str
    index: int          # row number in the test CSV (0-based, header excluded)
    question: str
    choices: list[str]
    answer: int         # 0-3


def read_csv(path: Path, subject: str) -> list[Question]:
    """Reads one MMLU CSV in either layout (see module doc); clear errors with file and line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; an MMLU dir holds dev/{{subject}}_dev.csv and "
                         "test/{subject}_test.csv") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable UTF-8 CSV ({e})") from None
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    has_header = header[:1] == ["question"]
    out = []
    for ln, row in enumerate(rows[1:] if has_header else rows, start=2 if has_header else 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 6:
            raise ValueError(f"{path}:{ln}: expected 6 columns (question, 4 choices, answer), got {len(row)}")
        ans = row[5].strip()
        if has_header:
            if ans not in ("0", "1", "2", "3"):
                raise ValueError(f"{path}:{ln}: field 'answer' must be an integer 0-3 in this layout, got {ans!r}")
            a = int(ans)
        else:
            if ans.upper() not in LETTERS:
                raise ValueError(f"{path}:{ln}: answer must be a letter A-D in the headerless layout, got {ans!r}")
            a = LETTERS.index(ans.upper())
        out.append(Question(subject, len(out), row[0], [c for c in row[1:5]], a))
    return out


def subjects_in(data_dir: Path) -> list[str]:
    test = data_dir / "test"
    if not test.is_dir():
        raise SystemExit(f"{data_dir}: no test/ directory; expected dev/{{subject}}_dev.csv and test/{{subject}}_test.csv")
    subs = sorted(p.name[: -len("_test.csv")] for p in test.glob("*_test.csv"))
    if not subs:
        raise SystemExit(f"{test}: no *_test.csv files")
    return subs


def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def format_example(q: Question, with_answer: bool) -> str:
    s = q.question.strip()
    for letter, choice in zip(LETTERS, q.choices):
        s += f"\n{letter}. {choice}"
    s += "\nAnswer:"
    if with_answer:
        s += f" {LETTERS[q.answer]}\n\n"
    return s


def build_prompt(q: Question, shots: list[Question]) -> str:
    prompt = f"The following are multiple choice questions (with answers) about {format_subject(q.subject)}.\n\n"
    return prompt + "".join(format_example(s, True) for s in shots) + format_example(q, False)


@dataclass
class MMLUConfig(ModelArgs):
    data_dir: str = opt(None, "MMLU dir with dev/ and test/ CSVs (either layout)")
    shots: int = opt(5, "number of dev exemplars per prompt (0-5)")
    subjects: str | None = opt(None, "comma-separated subset of subjects (default: all in data_dir/test)")
    limit: int | None = opt(None, "at most this many test questions per subject (quick runs)")

    def validate(self):
        if not self.data_dir:
            raise SystemExit("--data_dir is required (a dir with dev/ and test/ MMLU CSVs)")
        if not 0 <= self.shots <= 5:
            raise SystemExit(f"--shots must be 0..5 (the dev split has 5 exemplars per subject), got {self.shots}")


def load_prompts(cfg: MMLUConfig) -> tuple[list[Question], list[str]]:
    """The test questions of ``cfg`` and their k-shot prompts; a malformed CSV raises ValueError."""
    data_dir = Path(cfg.data_dir)
    subjects = subjects_in(data_dir)
    if cfg.subjects:
        want = [s.strip() for s in cfg.subjects.split(",") if s.strip()]
        unknown = sorted(set(want) - set(subjects))
        if unknown:
            raise SystemExit(f"{data_dir}/test: no CSV for subject(s) {unknown}")
        subjects = want
    questions: list[Question] = []
    prompts: list[str] = []
    for subj in subjects:
        dev_path = data_dir / "dev" / f"{subj}_dev.csv"
        shots = read_csv(dev_path, subj)[: cfg.shots] if cfg.shots else []
        if cfg.shots and len(shots) < cfg.shots:
            raise SystemExit(f"{dev_path}: {len(shots)} dev rows, {cfg.shots} shots requested")
        test = read_csv(data_dir / "test" / f"{subj}_test.csv", subj)
        for q in test[: cfg.limit] if cfg.limit else test:
            questions.append(q)
            prompts.append(build_prompt(q, shots))
    return questions, prompts


def run(cfg: MMLUConfig, loaded=None) -> dict:
    try:
        questions, prompts = load_prompts(cfg)
    except ValueError as e:  # names the file, line and field: one line, no traceback
        raise SystemExit(str(e)) from None
    loaded = loaded or load(cfg)
    t0 = time.time()
    pairs = [(p, f" {letter}") for p in prompts for letter in LETTERS]
    scores = loglikelihood(loaded, pairs, cfg.batch_size, cfg.max_length, cfg.add_bos, desc="mmlu")
    elapsed = time.time() - t0

    per_subject: dict[str, list[int]] = defaultdict(list)
    records = []
    for qi, q in enumerate(questions):
        lps = [scores[4 * qi + j].logprob for j in range(4)]
        pred = max(range(4), key=lambda j: lps[j])
        per_subject[q.subject].append(int(pred == q.answer))
        records.append({"subject": q.subject, "index": q.index, "answer": LETTERS[q.answer],
                        "pred": LETTERS[pred], "correct": pred == q.answer, "logprobs": lps})
    subj_acc = {s: sum(v) / len(v) for s, v in per_subject.items() if v}
    cats: dict[str, list[int]] = defaultdict(list)
    for s, v in per_subject.items():
        cats[category(s)].extend(v)
    all_correct = [c for v in per_subject.values() for c in v]
    result = {
        "benchmark": "mmlu",
        "formulation": "log-likelihood of ' A'..' D' after 'Answer:' (lm-eval-harness / Hendrycks prompt)",
        "shots": cfg.shots,
        "n_questions": len(all_correct),
        "n_subjects": len(subj_acc),
        "accuracy_micro": sum(all_correct) / len(all_correct) if all_correct else float("nan"),
        "accuracy_macro": sum(subj_acc.values()) / len(subj_acc) if subj_acc else float("nan"),
        "categories": {c: {"accuracy": sum(v) / len(v), "n": len(v)} for c, v in sorted(cats.items())},
        "subjects": {s: {"accuracy": a, "n": len(per_subject[s]), "category": category(s)}
                     for s, a in sorted(subj_acc.items())},
        "chance": 0.25,
        "seconds": elapsed,
        "config": vars(cfg),
        "environment": environment(),
    }
    out = Path(cfg.output) if cfg.output else default_output("mmlu", cfg.model, cfg.lora_model, f"_{cfg.shots}shot")
    result["per_question"] = str(write_jsonl(out.with_suffix(".jsonl"), records))
    write_json(out, result)
    result["output"] = str(out)
    return result


def report(result: dict) -> str:
    rows = [["all (micro)", result["n_questions"], result["accuracy_micro"]],
            ["all (macro over subjects)", result["n_subjects"], result["accuracy_macro"]]]
    rows += [[c, v["n"], v["accuracy"]] for c, v in result["categories"].items()]
    return markdown_table(["MMLU " + f"{result['shots']}-shot", "n", "accuracy"], rows)


@exit_on_model_path_error
def main(argv=None) -> int:
    cfg = parse_config(MMLUConfig, argv, __doc__)
    result = run(cfg)
    print(report(result))
    print(f"\nper-subject accuracies and the config: {result['output']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
