"""``evaluate`` metric: quality of ABC tunes, computed by tunesmith's own checks (``benchmarks.abc_quality``'s
``score_tunes`` / ``summarise``, which call ``benchmarks.abc_metrics`` and the real abc2midi), so a
``Trainer(compute_metrics=...)`` or any script gets the same figures as ``python -m benchmarks.abc_quality``.

Load it from the repository (works offline; it needs tunesmith importable and abc2midi on PATH)::

    import evaluate
    abc = evaluate.load("benchmarks/metrics/abc_quality")      # the path of this directory
    abc.compute(predictions=[tune1, tune2], keys=["G", None], meters=["6/8", None],
                train_tunes=corpus_tunes, music21=False)

``predictions``: one ABC tune per item (``None`` or ``""`` = nothing could be extracted: counted as an
abc2midi error). Optional keyword arguments: ``keys`` / ``meters`` (the requested key / meter per item, or
None; enable key / meter compliance), ``train_tunes`` (tunes of the training corpus; enable exact and near
copies), ``ngram`` (10) and ``overlap_threshold`` (0.8) of the near-copy check, ``music21`` (False: music21's
parser is slow). Returns ``benchmarks.abc_quality.summarise``'s dict: ``parse_rate`` (abc2midi wrote MIDI with
no error), ``midi_rate``, ``abc2midi_clean`` / ``_warnings`` / ``_errors``, ``bar_consistency`` (share of bars
matching M:/L:), ``tunes_all_bars_consistent``, ``repetition_rate``, ``exact_copy_rate`` /
``near_copy_rate``, ``key_compliance`` / ``meter_compliance`` (None where not computable).
"""
import datasets
import evaluate

from benchmarks import abc_metrics, abc_quality

_DESCRIPTION = __doc__
_KWARGS = """
Args:
    predictions: list of ABC tunes (str, or None where no tune was produced).
    keys: optional list (same length) of requested keys, e.g. "G", "Em", or None.
    meters: optional list of requested meters, e.g. "6/8", or None.
    train_tunes: optional list of training tunes for the copy checks.
    ngram: character n-gram length of the near-copy check (10).
    overlap_threshold: n-gram overlap at or above which a tune is a near copy (0.8).
    music21: also parse every tune with music21 (False).
Returns:
    dict of rates, see the module docstring.
"""


class AbcQuality(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
                                   features=datasets.Features({"predictions": datasets.Value("string")}))

    def _compute(self, predictions, keys=None, meters=None, train_tunes=None, ngram=10, overlap_threshold=0.8,
                 music21=False):
        n = len(predictions)
        for name, xs in (("keys", keys), ("meters", meters)):
            if xs is not None and len(xs) != n:
                raise ValueError(f"abc_quality: {name} has {len(xs)} items, predictions {n}; give one per tune")
        entries = [{"source": "metric", "abc": t or None, "key": (keys or [None] * n)[i],
                    "meter": (meters or [None] * n)[i]} for i, t in enumerate(predictions)]
        memo = abc_metrics.MemorisationIndex(list(train_tunes), ngram) if train_tunes is not None else None
        abc_quality.score_tunes(entries, memo, overlap_threshold, music21)
        return abc_quality.summarise(entries, music21, memo is not None)
