"""The ABC constraint's corpus property: it does not forbid real music.

    python -m benchmarks.constraint_property [--corpus music21] [--limit N] [--workers 2] [--show 20]

For every tune of a corpus, abc2midi (the real binary) gives its verdict: an error, a bar warning ("Bar N
has x time units while the time signature has y"), or clean. Every clean tune is then fed, char by char, to
``inference.abc_constraint.AbcState`` under the tune's own header fields (what a request for exactly this
tune would ask). The property: every prefix of every clean tune stays allowed, except where the tune does
not keep time or breaks one of the constraint's written rules. Each refusal is put in one class:

* ``bars``: ``benchmarks.abc_metrics.check_bars`` (the bar checker behind the "bars consistent" figure)
  also finds a bar whose length is not the meter's. abc2midi checks lengths only at barlines, so it is
  silent on a line that runs past a bar with no ``|`` and on unbarred music whose notes cross where the
  bars fall (music21's Josquin transcriptions: ``M:C|`` ``L:1/2`` ``d3``). Keeping every bar is the
  constraint's purpose: these are refused on purpose.
* ``header_text``: a header line that is not a field (``I :: ::``): ABC 2.1's header holds fields only.
* ``incomplete_end``: the tune ends (a blank line) in a bar that is neither full nor completes the pickup:
  the constraint lets a tune end only at a complete bar.
* ``empty_bars``: more barlines in a row with nothing between them than the cap a model cannot loop past
  (``| | | |``, the degenerate reply; music21's incipits open with 4 at most).
* ``prose_run``: 3+ letters in a row, 2+ of them decorations (``eBTHe``): ``inference.abc_extract`` reads such a
  run as a word of prose and would find no tune in the reply, so the constraint never writes one.
* ``other``: none of these: a refusal of real music, i.e. a bug. The command exits 1 when there is one.

Writes a JSON record (counts, each refusal with its class and context) to ``--output``.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from multiprocessing import Pool

from benchmarks.abc_metrics import check_bars
from benchmarks.common import parse_config, write_json
from data_preprocess.abctools import abc_to_midi
from data_preprocess.corpus import iter_tunes
from data_preprocess.hub import ArgumentError, exit_on_argument_error
from inference.abc_constraint import AbcState, check_text, own_fields, to_machine_text, validate_fields

_BAR_WARNING = re.compile(r"Bar [0-9]+ has .* time units")
CLASSES = ("bars", "header_text", "incomplete_end", "empty_bars", "prose_run", "other")


@dataclass
class PropertyConfig:
    corpus: str = "music21"
    """music21, a dir of .abc, a .jsonl ... (data_preprocess.corpus)"""
    limit: int = 0
    """a deterministic sample of N tunes (0 = all)"""
    seed: int = 0
    """the sample's seed"""
    workers: int = 2
    """processes running abc2midi and the state machine"""
    show: int = 20
    """refusals to print"""
    output: str = "outputs/benchmarks/constraint_property.json"
    """where the JSON record goes"""

    def validate(self):
        if self.workers < 1 or self.limit < 0:
            raise ArgumentError(f"--workers {self.workers} / --limit {self.limit}: workers >= 1, limit >= 0")


def refusal_class(tune: str, i: int) -> str:
    """Why the constraint refused ``tune`` at machine-text index ``i`` (see the module doc): the written
    rules are read off the state at the refusal first, then the bar checker."""
    mt = to_machine_text(tune)
    st = AbcState(validate_fields(own_fields(tune)))
    for c in mt[:i]:
        st.feed(c)
    c = mt[i]
    if st.mode == "h_start" and c != "\n" and not re.match(r"[A-Za-z+]:", mt[i:i + 2]):
        return "header_text"
    if st.mode == "b_start" and c == "\n" and not st.can_end():
        return "incomplete_end"
    if c in "|:" and st.phase == "body" and st.n == 0 and not st.multi and st.empties >= st.empty_cap():
        return "empty_bars"
    if c.isascii() and c.isalpha() and st.clone()._prose_run(c):
        return "prose_run"
    return "bars" if check_bars(tune).consistent is False else "other"


def check_corpus_tune(tune: str) -> dict:
    """One tune: abc2midi's verdict (``error`` / ``bar_warning`` / ``ok``) and, for ``ok`` tunes, whether
    every prefix is allowed (``refused_at``: the first refused character and its context, ``class``: why)
    and whether EOS is allowed at its end."""
    r = abc_to_midi(tune)
    if not r.ok or r.errors:
        return {"abc2midi": "error"}
    if any(_BAR_WARNING.search(w) for w in r.warnings):
        return {"abc2midi": "bar_warning"}
    try:
        st, i = check_text(tune, own_fields(tune))
    except ValueError as e:  # (ConstraintError: a header field the constraint cannot ask for)
        return {"abc2midi": "ok", "accepted": False, "refused_at": f"fields: {e}", "class": "other"}
    if st is None:
        mt = to_machine_text(tune)
        return {"abc2midi": "ok", "accepted": False, "refused_at": f"{i}: {mt[max(0, i - 30):i]!r} + {mt[i]!r}",
                "class": refusal_class(tune, i), "title": next((ln[2:].strip() for ln in tune.splitlines()
                                                                if ln.startswith("T:")), "")}
    return {"abc2midi": "ok", "accepted": True, "can_end": st.can_end()}


def corpus_property(tunes: list[str], workers: int = 1) -> dict:
    """Counts of :func:`check_corpus_tune` over ``tunes`` and the refusals by class."""
    if workers > 1:
        with Pool(workers) as pool:
            res = pool.map(check_corpus_tune, tunes, chunksize=32)
    else:
        res = [check_corpus_tune(t) for t in tunes]
    ok = [r for r in res if r["abc2midi"] == "ok"]
    refused = [r for r in ok if not r["accepted"]]
    return {"tunes": len(tunes), "abc2midi_error": sum(r["abc2midi"] == "error" for r in res),
            "abc2midi_bar_warning": sum(r["abc2midi"] == "bar_warning" for r in res),
            "abc2midi_clean_bars": len(ok), "constraint_accepts": len(ok) - len(refused),
            "eos_allowed_at_end": sum(r.get("can_end", False) for r in ok),
            "refused_by_class": {c: sum(r["class"] == c for r in refused) for c in CLASSES},
            "refused": [{k: r[k] for k in ("class", "title", "refused_at") if k in r} for r in refused]}


@exit_on_argument_error
def main(argv=None) -> int:
    cfg = parse_config(PropertyConfig, argv, __doc__)
    tunes = [t.text for t in iter_tunes(cfg.corpus)]
    if cfg.limit and cfg.limit < len(tunes):
        tunes = random.Random(cfg.seed).sample(tunes, cfg.limit)
    r = corpus_property(tunes, cfg.workers)
    for x in sorted(r["refused"], key=lambda x: CLASSES.index(x["class"]), reverse=True)[:cfg.show]:
        print(f"refused ({x['class']}): {x.get('title', '')!r} at {x['refused_at']}")
    print(json.dumps({k: v for k, v in r.items() if k != "refused"}))
    print(f"wrote {write_json(cfg.output, {'config': vars(cfg), **r})}")
    return 1 if r["refused_by_class"]["other"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
