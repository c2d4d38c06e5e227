"""Token layouts of the audio branch: exact round trips, id ranges, loss masks, generation constraints."""
from __future__ import annotations

import numpy as np
import pytest

from data_preprocess.audio_layout import (
    BOA,
    AudioVocab,
    LayoutConstraint,
    audio_token_names,
    extend_tokenizer,
    make_layout,
)


def _vocab(K: int, N: int, text: int = 100) -> AudioVocab:
    return AudioVocab(text, K, N, text, text + 1, text + 2, tuple(text + 3 + k * N for k in range(K)))


@pytest.mark.parametrize("name", ["delay", "flatten"])
@pytest.mark.parametrize("K", range(1, 9))
@pytest.mark.parametrize("T", [1, 2, 7, 13])
def test_round_trip_exact(name, K, T):
    v = _vocab(K, 17)
    layout = make_layout(name, v)
    codes = np.random.default_rng(K * 100 + T).integers(0, 17, size=(K, T))
    body, mask = layout.encode(codes)
    assert len(body) == len(mask) == layout.num_tokens(T)
    assert np.array_equal(layout.decode(body), codes)
    # every body token is an audio token, codebook k's codes sit in codebook k's range
    assert v.is_audio(body).all() and (body >= v.text_vocab_size).all()
    # the full document inverts too, and the loss is only on codes and stop decisions
    ids, dmask = layout.document([5, 6, 7], codes, bos_id=1, eos_id=2)
    assert np.array_equal(layout.decode(layout.body_of(ids)), codes)
    targets = ids[dmask == 1]
    assert v.is_audio(targets).all() and (targets != v.boa_id).all()
    assert (targets == v.eoa_id).sum() == 1
    code_tokens = sum(((ids >= lo) & (ids < hi)).sum() for lo, hi in map(v.code_range, range(K)))
    n_stop = 1 + (name == "delay" and K > 1)                   # <eoa> (+ the first codebook-0 <fill>)
    assert dmask.sum() == code_tokens + n_stop == K * T + n_stop
    assert dmask[:5].sum() == 0 and dmask[-1] == 0            # <s> caption <boa> ... </s> never targets


def test_delay_pattern_is_musicgen_shift():
    v = _vocab(3, 10)
    codes = np.array([[1, 2], [3, 4], [5, 6]])
    body, _ = make_layout("delay", v).encode(codes)
    grid = body.reshape(-1, 3) - np.array(v.code_offsets)       # [step, codebook]
    F = v.fill_id
    expect = [[1, F, F], [2, 3, F], [F, 4, 5], [F, F, 6]]
    for s, row in enumerate(expect):
        for k, c in enumerate(row):
            assert body[s * 3 + k] == (F if c == F else c + v.code_offsets[k])
    assert grid.shape == (2 + 3 - 1, 3)


def test_flatten_is_frame_major():
    v = _vocab(2, 10)
    body, _ = make_layout("flatten", v).encode(np.array([[1, 2, 3], [4, 5, 6]]))
    o0, o1 = v.code_offsets
    assert body.tolist() == [o0 + 1, o1 + 4, o0 + 2, o1 + 5, o0 + 3, o1 + 6]


@pytest.mark.parametrize("name", ["delay", "flatten"])
def test_decode_rejects_invalid_and_truncated(name):
    v = _vocab(4, 8)
    layout = make_layout(name, v)
    body, _ = layout.encode(np.zeros((4, 5), int))
    bad = body.copy()
    bad[1] = v.code_offsets[0]                                  # a codebook-0 code in codebook 1's slot
    with pytest.raises(ValueError, match="position"):
        layout.decode(bad if name == "flatten" else np.where(np.arange(len(bad)) == 5, v.code_offsets[2], bad))
    with pytest.raises(ValueError):
        layout.decode(body[:-1])
    # non-strict decoding of a cut-off stream keeps only complete frames
    part = layout.decode(body[: len(body) - 3], strict=False)
    assert part.shape[0] == 4 and part.shape[1] in (3, 4) and (part == 0).all()


def test_codes_out_of_range_refused():
    layout = make_layout("flatten", _vocab(2, 8))
    with pytest.raises(ValueError, match="outside"):
        layout.encode(np.array([[0, 8], [1, 1]]))
    with pytest.raises(ValueError, match="K=2"):
        layout.encode(np.zeros((3, 4), int))


def test_vocab_rejects_overlap_with_text():
    with pytest.raises(ValueError, match="inside the text vocabulary"):
        AudioVocab(100, 1, 8, 99, 100, 101, (102,))
    with pytest.raises(ValueError, match="overlap"):
        AudioVocab(100, 2, 8, 100, 101, 102, (103, 105))


@pytest.mark.parametrize("name", ["delay", "flatten"])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_constraint_walk_yields_valid_layout(name, K):
    """Random walks through the allowed sets always decode to min..max frames, and accept the true layout."""
    v = _vocab(K, 6)
    layout = make_layout(name, v)
    rng = np.random.default_rng(K)
    for trial in range(20):
        lo_f, hi_f = (5, 5) if trial % 2 else (2, 6)
        c = LayoutConstraint(layout, lo_f, hi_f)
        body = []
        while not c.done:
            ranges = c.allowed()
            lo, hi = ranges[rng.integers(len(ranges))]
            tok = int(rng.integers(lo, hi))
            c.push(tok)
            if not c.done:
                body.append(tok)
        codes = layout.decode(body)
        assert lo_f <= codes.shape[1] <= hi_f and codes.shape[1] == c.T
    # the encoding of real codes is a legal path through the constraint
    codes = rng.integers(0, 6, size=(K, 4))
    body, _ = layout.encode(codes)
    c = LayoutConstraint(layout, 1, 10)
    for tok in list(body) + [v.eoa_id]:
        c.push(int(tok))
    assert c.done and c.T == 4
    with pytest.raises(ValueError, match="not legal"):
        LayoutConstraint(layout, 1, 10).push(v.eoa_id)            # stopping before the first frame


def test_extended_tokenizer_never_collides_with_text(tokenizer_dir):
    """Audio ids start after the text vocab, are contiguous per codebook, and ABC text never maps to them."""
    from transformers import AutoTokenizer

    from tests.conftest import music21_abc_texts

    base = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    v = extend_tokenizer(tok, 4, 64)
    assert v.text_vocab_size == len(base) and len(tok) == len(base) + 3 + 4 * 64 == v.vocab_size
    names = audio_token_names(4, 64)
    assert tok.convert_tokens_to_ids(names) == list(range(len(base), len(base) + len(names)))
    for text in music21_abc_texts(5) + ["a jig in D major, 6/8 time, played on violin: The Kesh"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == base.encode(text, add_special_tokens=False)
        assert max(ids) < v.text_vocab_size
    assert extend_tokenizer(tok, 4, 64) == v                     # re-extension is idempotent
    with pytest.raises(ValueError, match="geometry"):
        extend_tokenizer(tok, 2, 64)
    assert tok.convert_tokens_to_ids(BOA) == v.boa_id
