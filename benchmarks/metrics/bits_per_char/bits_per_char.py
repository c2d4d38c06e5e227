"""``evaluate`` metric: bits per character (and per token) of text from the model's negative log-likelihoods,
with gzip -9's bits per character of the same text beside it, by ``benchmarks.bits_per_char.figures`` (the
formula of ``python -m benchmarks.bits_per_char``).

    import evaluate
    bpc = evaluate.load("benchmarks/metrics/bits_per_char")     # the path of this directory
    bpc.compute(predictions=nll_per_doc, references=doc_texts, n_tokens=tokens_per_doc)

``predictions``: per document, the sum over its predicted tokens of -log p (natural log, nats), e.g. the
``nll`` column of the ``per_document`` JSONL that ``benchmarks.bits_per_char`` writes, or the summed token
losses of an eval batch. ``references``: the documents' texts. Optional: ``n_tokens`` (tokens scored per
document; gives bits_per_token), ``n_chars`` (characters those tokens cover, when that is not the whole text,
e.g. without BOS the first token is context only). Returns ``bits_per_char``, ``bits_per_token``,
``perplexity_per_token``, ``chars_per_token``, ``gzip_bits_per_char``, ``n_chars``, ``n_tokens``.
"""
import datasets
import evaluate

from benchmarks import bits_per_char

_KWARGS = """
Args:
    predictions: per-document summed negative log-likelihood in nats (float).
    references: the document texts (str).
    n_tokens: optional per-document number of scored tokens.
    n_chars: optional per-document number of characters covered by the scored tokens (default: len(text)).
Returns:
    dict with bits_per_char, bits_per_token, perplexity_per_token, chars_per_token, gzip_bits_per_char.
"""


class BitsPerChar(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description=_KWARGS,
                                   features=datasets.Features({"predictions": datasets.Value("float64"),
                                                               "references": datasets.Value("string")}))

    def _compute(self, predictions, references, n_tokens=None, n_chars=None):
        for name, xs in (("n_tokens", n_tokens), ("n_chars", n_chars)):
            if xs is not None and len(xs) != len(predictions):
                raise ValueError(f"bits_per_char: {name} has {len(xs)} items, predictions {len(predictions)}")
        chars = list(n_chars) if n_chars is not None else [len(t) for t in references]
        return bits_per_char.figures(list(predictions), chars, None if n_tokens is None else list(n_tokens),
                                     list(references))
