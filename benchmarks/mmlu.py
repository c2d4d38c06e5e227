"""MMLU (Hendrycks et al. 2021), k-shot, scored by log-likelihood: of the answer letter (``letter``, the
default) or of the answer text (``cloze``), or both.

    python -m benchmarks.mmlu --model M [--lora_model L] --data_dir DIR --shots 5 [--limit N] \
        [--formulation letter|cloze|both]

``letter``: the prompt is the original / lm-evaluation-harness ``mmlu`` one::

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
papers.

``cloze``: lm-eval-harness' ``mmlu_continuation`` task. The options are not shown; the prompt is::

    The following are questions (with answers) about abstract algebra.

    Question: {dev question 1}
    Answer: {its answer text}

    ... (k dev exemplars) ...

    Question: {test question}
    Answer:

and each option is scored by the log-likelihood of `` {option text}``. ``acc`` takes the highest sum,
``acc_norm`` the highest sum per UTF-8 byte of the option text (lm-eval divides by its character count,
the same for ASCII). Small models that cannot yet map a letter to an option (letter accuracy at chance)
often score above chance here, which is why both are reported. ``DIR`` holds ``dev/{subject}_dev.csv`` and ``test/{subject}_test.csv`` in either layout:
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
    parse_config,
    write_json,
    write_jsonl,
)
from data_preprocess.hub import ArgumentError, exit_on_argument_error

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
        raise ArgumentError(f"{data_dir}: no test/ directory; expected dev/{{subject}}_dev.csv and test/{{subject}}_test.csv")
    subs = sorted(p.name[: -len("_test.csv")] for p in test.glob("*_test.csv"))
    if not subs:
        raise ArgumentError(f"{test}: no *_test.csv files")
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


def format_cloze(q: Question, with_answer: bool) -> str:
    """lm-eval's ``mmlu_continuation`` doc_to_text; exemplars end in `` {answer text}`` and a blank line."""
    s = f"Question: {q.question.strip()}\nAnswer:"
    return s + (f" {q.choices[q.answer]}\n\n" if with_answer else "")


def build_cloze_prompt(q: Question, shots: list[Question]) -> str:
    prompt = f"The following are questions (with answers) about {format_subject(q.subject)}.\n\n"
    return prompt + "".join(format_cloze(s, True) for s in shots) + format_cloze(q, False)


FORMULATIONS = {"letter": "log-likelihood of ' A'..' D' after 'Answer:' (lm-eval-harness / Hendrycks prompt)",
                "cloze": "log-likelihood of ' {option text}' after 'Question: ..\\nAnswer:' (lm-eval-harness "
                         "mmlu_continuation); acc_norm per UTF-8 byte of the option text"}


@dataclass
class MMLUConfig(ModelArgs):
    data_dir: str = None
    """MMLU dir with dev/ and test/ CSVs (either layout)"""
    shots: int = 5
    """number of dev exemplars per prompt (0-5)"""
    subjects: str | None = None
    """comma-separated subset of subjects (default: all in data_dir/test)"""
    limit: int | None = None
    """at most this many test questions per subject (quick runs)"""
    formulation: str = "letter"
    """letter (score ' A'..' D') | cloze (score the option text, lm-eval's mmlu_continuation) | both"""

    def validate(self):
        if not self.data_dir:
            raise ArgumentError("--data_dir is required (a dir with dev/ and test/ MMLU CSVs)")
        if not 0 <= self.shots <= 5:
            raise ArgumentError(f"--shots must be 0..5 (the dev split has 5 exemplars per subject), got {self.shots}")
        if self.formulation not in ("letter", "cloze", "both"):
            raise ArgumentError(f"--formulation must be letter, cloze or both, got {self.formulation!r}")

    @property
    def formulations(self) -> list[str]:
        return ["letter", "cloze"] if self.formulation == "both" else [self.formulation]


def load_questions(cfg: MMLUConfig) -> tuple[list[Question], dict[str, list[Question]]]:
    """The test questions of ``cfg`` and each subject's k dev exemplars; a malformed CSV raises ValueError."""
    data_dir = Path(cfg.data_dir)
    subjects = subjects_in(data_dir)
    if cfg.subjects:
        want = [s.strip() for s in cfg.subjects.split(",") if s.strip()]
        unknown = sorted(set(want) - set(subjects))
        if unknown:
            raise ArgumentError(f"{data_dir}/test: no CSV for subject(s) {unknown}")
        subjects = want
    questions: list[Question] = []
    shots_of: dict[str, list[Question]] = {}
    for subj in subjects:
        dev_path = data_dir / "dev" / f"{subj}_dev.csv"
        shots_of[subj] = read_csv(dev_path, subj)[: cfg.shots] if cfg.shots else []
        if cfg.shots and len(shots_of[subj]) < cfg.shots:
            raise ArgumentError(f"{dev_path}: {len(shots_of[subj])} dev rows, {cfg.shots} shots requested")
        test = read_csv(data_dir / "test" / f"{subj}_test.csv", subj)
        questions += test[: cfg.limit] if cfg.limit else test
    return questions, shots_of


def request_pairs(questions: list[Question], shots_of: dict[str, list[Question]],
                  formulation: str) -> list[tuple[str, str]]:
    """(context, continuation) pairs, four per question in option order, of one formulation."""
    if formulation == "letter":
        return [(build_prompt(q, shots_of[q.subject]), f" {letter}") for q in questions for letter in LETTERS]
    return [(build_cloze_prompt(q, shots_of[q.subject]), f" {c}") for q in questions for c in q.choices]


def _accuracies(questions: list[Question], correct: list[int]) -> dict:
    """Micro / macro / per-category / per-subject accuracy of 0/1 ``correct`` (one per question)."""
    per_subject: dict[str, list[int]] = defaultdict(list)
    for q, c in zip(questions, correct):
        per_subject[q.subject].append(c)
    subj_acc = {s: sum(v) / len(v) for s, v in per_subject.items() if v}
    cats: dict[str, list[int]] = defaultdict(list)
    for s, v in per_subject.items():
        cats[category(s)].extend(v)
    return {
        "accuracy_micro": sum(correct) / len(correct) if correct else float("nan"),
        "accuracy_macro": sum(subj_acc.values()) / len(subj_acc) if subj_acc else float("nan"),
        "categories": {c: {"accuracy": sum(v) / len(v), "n": len(v)} for c, v in sorted(cats.items())},
        "subjects": {s: {"accuracy": a, "n": len(per_subject[s]), "category": category(s)}
                     for s, a in sorted(subj_acc.items())},
    }


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda j: xs[j])


def run(cfg: MMLUConfig, loaded=None) -> dict:
    """Evaluates every formulation of ``cfg``. The top-level accuracies are the letter formulation's (or the
    cloze one's when only cloze runs); ``result["cloze"]`` holds cloze acc and acc_norm when it ran."""
    try:
        questions, shots_of = load_questions(cfg)
    except ValueError as e:  # names the file, line and field: one line, no traceback
        raise ArgumentError(str(e)) from None
    loaded = loaded or load(cfg)
    records = [{"subject": q.subject, "index": q.index, "answer": LETTERS[q.answer]} for q in questions]
    result: dict = {"benchmark": "mmlu", "formulation": FORMULATIONS[cfg.formulations[0]],
                    "formulations": cfg.formulations, "shots": cfg.shots,
                    "n_questions": len(questions), "n_subjects": len({q.subject for q in questions})}
    seconds = {}
    for form in cfg.formulations:
        t0 = time.time()
        pairs = request_pairs(questions, shots_of, form)
        scores = loglikelihood(loaded, pairs, cfg.batch_size, cfg.max_length, cfg.add_bos, desc=f"mmlu {form}")
        seconds[form] = time.time() - t0
        lps = [[scores[4 * qi + j].logprob for j in range(4)] for qi in range(len(questions))]
        preds = [_argmax(x) for x in lps]
        correct = [int(p == q.answer) for p, q in zip(preds, questions)]
        if form == "letter":
            for rec, p, c, x in zip(records, preds, correct, lps):
                rec.update(pred=LETTERS[p], correct=bool(c), logprobs=x)
            result.update(_accuracies(questions, correct))
            continue
        nbytes = [[max(1, len(c.encode("utf-8"))) for c in q.choices] for q in questions]
        preds_norm = [_argmax([lp / n for lp, n in zip(x, nb)]) for x, nb in zip(lps, nbytes)]
        correct_norm = [int(p == q.answer) for p, q in zip(preds_norm, questions)]
        for rec, p, pn, x in zip(records, preds, preds_norm, lps):
            rec.update(cloze_pred=LETTERS[p], cloze_pred_norm=LETTERS[pn], cloze_logprobs=x)
        acc, acc_norm = _accuracies(questions, correct), _accuracies(questions, correct_norm)
        result["cloze"] = {"formulation": FORMULATIONS["cloze"], **acc,
                           "acc_norm_micro": acc_norm["accuracy_micro"], "acc_norm_macro": acc_norm["accuracy_macro"],
                           "acc_norm_categories": acc_norm["categories"], "seconds": seconds[form]}
        if cfg.formulations == ["cloze"]:
            result.update(acc)
    result.update(chance=0.25, seconds=sum(seconds.values()), seconds_per_formulation=seconds, config=vars(cfg),
                  environment=environment())
    extra = f"_{cfg.shots}shot" + ("_cloze" if cfg.formulations == ["cloze"] else "")
    out = Path(cfg.output) if cfg.output else default_output("mmlu", cfg.model, cfg.lora_model, extra)
    result["per_question"] = str(write_jsonl(out.with_suffix(".jsonl"), records))
    write_json(out, result)
    result["output"] = str(out)
    return result


def report(result: dict) -> str:
    forms = result.get("formulations", ["letter"])
    title = f"MMLU {result['shots']}-shot"
    if forms == ["letter"]:
        rows = [["all (micro)", result["n_questions"], result["accuracy_micro"]],
                ["all (macro over subjects)", result["n_subjects"], result["accuracy_macro"]]]
        rows += [[c, v["n"], v["accuracy"]] for c, v in result["categories"].items()]
        return markdown_table([title, "n", "accuracy"], rows)
    cz = result["cloze"]
    letter = "letter" in forms
    heads = [title, "n"] + (["letter acc"] if letter else []) + ["cloze acc", "cloze acc_norm"]

    def row(label, n, lt, c, cn):
        return [label, n] + ([lt] if letter else []) + [c, cn]

    rows = [row("all (micro)", result["n_questions"], result["accuracy_micro"], cz["accuracy_micro"],
                cz["acc_norm_micro"]),
            row("all (macro over subjects)", result["n_subjects"], result["accuracy_macro"], cz["accuracy_macro"],
                cz["acc_norm_macro"])]
    rows += [row(c, v["n"], result["categories"][c]["accuracy"], v["accuracy"],
                 cz["acc_norm_categories"][c]["accuracy"]) for c, v in cz["categories"].items()]
    return markdown_table(heads, rows)


@exit_on_argument_error
def main(argv=None) -> int:
    cfg = parse_config(MMLUConfig, argv, __doc__)
    result = run(cfg)
    print(report(result))
    print(f"\nper-subject accuracies and the config: {result['output']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
