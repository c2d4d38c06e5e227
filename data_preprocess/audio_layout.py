"""Token layouts that turn neural-codec codes ``[K, T]`` into one token stream for a decoder-only LLaMA.

A codec (EnCodec, DAC) gives ``K`` codebooks of ``N`` codes per frame (``facebook/encodec_32khz``: 50
frames/s, K=4, N=2048). The language model reads one token per position, so the codes are serialised:

``flatten`` (music_llm)      frame-major interleave: ``c[0,0] c[1,0] .. c[K-1,0]  c[0,1] c[1,1] ..``.
                             ``T*K`` tokens; the model predicts every codebook of a frame in order.
``delay``   (MusicGen)       codebook ``k`` is shifted right by ``k`` steps and the ``T+K-1`` steps are
                             written step-major, ``K`` tokens per step; slots outside the shifted
                             codebook hold ``<fill>``. When a fine codebook of frame ``t`` is predicted,
                             the coarse codebooks of frames up to ``t+k`` are already known.

Every codebook has its own token range (``<a{k}_{c}>`` at ``code_offsets[k] + c``), so a token says which
codebook it is and codes of different codebooks never share an embedding. All audio tokens are added
after the text vocabulary, so they never collide with text ids.

A training document is ``<s> caption <boa> audio-body <eoa> </s>``. The loss mask is 1 exactly on the
tokens the model has to choose: the codes, the stop decision (``<eoa>``; in ``delay`` also the first
``<fill>`` in codebook 0's slot, which is where the audio ends) -- never on the caption, ``<boa>``, the
layout's forced ``<fill>`` padding or ``</s>``.

Generation uses :class:`LayoutConstraint`: for every next position it says which token ids are legal,
so a sampled stream is always a valid layout and :meth:`Layout.decode` inverts it exactly.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

BOA, EOA, FILL = "<boa>", "<eoa>", "<fill>"
LAYOUTS = ("delay", "flatten")


def code_token(k: int, c: int) -> str:
    """The added-token string of code ``c`` of codebook ``k``."""
    return f"<a{k}_{c}>"


def audio_token_names(num_codebooks: int, codebook_size: int) -> list[str]:
    """All audio tokens in id order: the 3 specials, then codebook 0's codes, codebook 1's, ..."""
    return [BOA, EOA, FILL] + [code_token(k, c) for k in range(num_codebooks) for c in range(codebook_size)]


@dataclass(frozen=True)
class AudioVocab:
    """Where the audio tokens live in the (extended) vocabulary."""

    text_vocab_size: int          # ids below this are the text tokenizer's
    num_codebooks: int
    codebook_size: int
    boa_id: int
    eoa_id: int
    fill_id: int
    code_offsets: tuple[int, ...]  # id of <a{k}_0>

    def __post_init__(self):
        object.__setattr__(self, "code_offsets", tuple(int(o) for o in self.code_offsets))
        if len(self.code_offsets) != self.num_codebooks:
            raise ValueError(f"{len(self.code_offsets)} code offsets for {self.num_codebooks} codebooks")
        ranges = sorted([(o, o + self.codebook_size) for o in self.code_offsets]
                        + [(i, i + 1) for i in (self.boa_id, self.eoa_id, self.fill_id)])
        if ranges[0][0] < self.text_vocab_size:
            raise ValueError(f"audio token ids start at {ranges[0][0]}, inside the text vocabulary "
                             f"(size {self.text_vocab_size})")
        for (a0, a1), (b0, _) in itertools.pairwise(ranges):
            if b0 < a1:
                raise ValueError(f"audio token ranges overlap at id {b0}")

    @property
    def vocab_size(self) -> int:
        """Smallest vocabulary that holds every text and audio id."""
        return max(max(self.code_offsets) + self.codebook_size, self.boa_id + 1, self.eoa_id + 1, self.fill_id + 1)

    def code_range(self, k: int) -> tuple[int, int]:
        return self.code_offsets[k], self.code_offsets[k] + self.codebook_size

    def is_audio(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        out = np.isin(ids, [self.boa_id, self.eoa_id, self.fill_id])
        for lo, hi in map(self.code_range, range(self.num_codebooks)):
            out |= (ids >= lo) & (ids < hi)
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["code_offsets"] = list(self.code_offsets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AudioVocab:
        return cls(**{k: d[k] for k in ("text_vocab_size", "num_codebooks", "codebook_size", "boa_id", "eoa_id",
                                         "fill_id", "code_offsets")})


def extend_tokenizer(tok, num_codebooks: int, codebook_size: int) -> AudioVocab:
    """Adds ``<boa> <eoa> <fill>`` and ``K*N`` code tokens to an HF tokenizer (in place) and returns where
    they are. They are added as special tokens so ``decode(skip_special_tokens=True)`` gives the caption.

    A tokenizer that already carries audio tokens (re-extension, or a checkpoint's tokenizer) is accepted
    when its geometry matches; otherwise a clear error says why.
    """
    from transformers import AddedToken

    names = audio_token_names(num_codebooks, codebook_size)
    vocab = tok.get_vocab()
    if BOA in vocab:
        text_size = min(vocab[BOA], vocab.get(EOA, 1 << 62), vocab.get(FILL, 1 << 62))
        missing = [n for n in names if n not in vocab]
        extra = code_token(num_codebooks, 0) in vocab or code_token(0, codebook_size) in vocab
        if missing or extra:
            raise ValueError(f"tokenizer already has audio tokens of another codec geometry than K={num_codebooks} "
                             f"x N={codebook_size}; start from the plain text tokenizer")
    else:
        text_size = len(tok)
        tok.add_tokens([AddedToken(n, special=True, normalized=False) for n in names], special_tokens=True)
        vocab = tok.get_vocab()
    offsets = [vocab[code_token(k, 0)] for k in range(num_codebooks)]
    for k, o in enumerate(offsets):  # contiguous ranges are what makes offset arithmetic valid
        if vocab[code_token(k, codebook_size - 1)] != o + codebook_size - 1:
            raise ValueError(f"codebook {k}: audio token ids are not contiguous in this tokenizer")
    return AudioVocab(text_size, num_codebooks, codebook_size, vocab[BOA], vocab[EOA], vocab[FILL], tuple(offsets))


# --------------------------------------------------------------------------------------------- layouts


class Layout:
    """Codes ``[K, T]`` <-> the audio body between ``<boa>`` and ``<eoa>`` (ids), plus its loss mask."""

    name = ""

    def __init__(self, vocab: AudioVocab):
        self.v = vocab
        self.K = vocab.num_codebooks

    # codes -> ids
    def encode(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    # ids -> codes
    def decode(self, body, strict: bool = True) -> np.ndarray:
        raise NotImplementedError

    def num_tokens(self, num_frames: int) -> int:
        """Body length (without <boa>/<eoa>) for ``num_frames`` frames."""
        raise NotImplementedError

    def _check_codes(self, codes) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != self.K:
            raise ValueError(f"codes must be [K={self.K}, T], got shape {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.v.codebook_size):
            raise ValueError(f"codes outside [0, {self.v.codebook_size}): min {codes.min()} max {codes.max()}")
        return codes.astype(np.int64)

    def _to_code(self, tok: int, k: int, pos: int) -> int:
        lo, hi = self.v.code_range(k)
        if not lo <= tok < hi:
            raise ValueError(f"audio body position {pos}: token id {tok} is not a codebook-{k} code "
                             f"(expected ids [{lo}, {hi}))")
        return tok - lo

    def document(self, caption_ids, codes, bos_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``<s> caption <boa> body <eoa> </s>`` and its loss mask (1 on codes and stop decisions only)."""
        body, body_mask = self.encode(codes)
        cap = np.asarray(list(caption_ids), dtype=np.int64)
        ids = np.concatenate([[bos_id], cap, [self.v.boa_id], body, [self.v.eoa_id, eos_id]]).astype(np.int64)
        mask = np.concatenate([np.zeros(len(cap) + 2, np.uint8), body_mask, [1, 0]]).astype(np.uint8)
        return ids, mask

    def body_of(self, ids) -> np.ndarray:
        """The audio body of a full/partial document or generated continuation: the tokens after the first
        ``<boa>`` (if any) up to the first ``<eoa>`` (if any)."""
        ids = np.asarray(ids, dtype=np.int64)
        b = np.flatnonzero(ids == self.v.boa_id)
        if len(b):
            ids = ids[b[0] + 1:]
        e = np.flatnonzero(ids == self.v.eoa_id)
        return ids[: e[0]] if len(e) else ids


class FlattenLayout(Layout):
    name = "flatten"

    def num_tokens(self, num_frames: int) -> int:
        return num_frames * self.K

    def encode(self, codes):
        codes = self._check_codes(codes)
        offs = np.asarray(self.v.code_offsets, dtype=np.int64)[:, None]
        body = (codes + offs).T.reshape(-1)           # frame-major
        return body, np.ones(len(body), np.uint8)

    def decode(self, body, strict=True):
        body = np.asarray(body, dtype=np.int64)
        n = len(body) - len(body) % self.K
        if strict and n != len(body):
            raise ValueError(f"flatten body of {len(body)} tokens is not a whole number of {self.K}-token frames")
        codes = np.empty((self.K, n // self.K), dtype=np.int64)
        for i in range(n):
            codes[i % self.K, i // self.K] = self._to_code(int(body[i]), i % self.K, i)
        return codes


class DelayLayout(Layout):
    name = "delay"

    def num_tokens(self, num_frames: int) -> int:
        return (num_frames + self.K - 1) * self.K

    def encode(self, codes):
        codes = self._check_codes(codes)
        K, T = codes.shape
        steps = T + K - 1
        grid = np.full((steps, K), self.v.fill_id, dtype=np.int64)   # [step, codebook]
        mask = np.zeros((steps, K), dtype=np.uint8)
        for k in range(K):
            grid[k:k + T, k] = codes[k] + self.v.code_offsets[k]
            mask[k:k + T, k] = 1
        if K > 1:
            mask[T, 0] = 1        # the first <fill> of codebook 0 is the "audio ends here" decision
        return grid.reshape(-1), mask.reshape(-1)

    def decode(self, body, strict=True):
        body = np.asarray(body, dtype=np.int64)
        K = self.K
        if strict:
            if len(body) % K or len(body) // K < K:
                raise ValueError(f"delay body of {len(body)} tokens is not (T+{K - 1}) steps of {K} tokens")
            T = len(body) // K - K + 1
        else:
            T = max(0, len(body) // K - K + 1)              # frames whose last codebook is complete
            if K > 1:
                col0 = body[0:len(body):K]
                stop = np.flatnonzero(col0 == self.v.fill_id)
                if len(stop):
                    T = min(T, int(stop[0]))
        codes = np.empty((K, T), dtype=np.int64)
        for s in range(min(len(body) // K, T + K - 1)):
            for k in range(K):
                i = s * K + k
                tok = int(body[i])
                t = s - k
                if 0 <= t < T:
                    codes[k, t] = self._to_code(tok, k, i)
                elif strict and tok != self.v.fill_id:
                    raise ValueError(f"delay body position {i} (step {s}, codebook {k}): expected <fill> "
                                     f"(id {self.v.fill_id}), got id {tok}")
        return codes


def make_layout(name: str, vocab: AudioVocab) -> Layout:
    if name == "delay":
        return DelayLayout(vocab)
    if name == "flatten":
        return FlattenLayout(vocab)
    raise ValueError(f"unknown audio layout {name!r}; choose one of {LAYOUTS}")


# --------------------------------------------------------------------------------------------- generation


class LayoutConstraint:
    """The legal next tokens of one audio body being generated, so sampling never leaves the layout.

    ``allowed()`` returns a list of half-open id ranges ``(lo, hi)``; a single-token list means that token
    is forced (the model is still run: its cache must see it). ``push(tok)`` records the chosen token.
    The number of frames is kept in ``[min_frames, max_frames]``: a stop is illegal before ``min_frames``
    and forced at ``max_frames`` (set both to get an exact duration).
    """

    def __init__(self, layout: Layout, min_frames: int = 1, max_frames: int = 500):
        if max_frames < 1 or min_frames > max_frames:
            raise ValueError(f"need 1 <= max_frames and min_frames <= max_frames, got {min_frames}, {max_frames}")
        self.layout, self.v, self.K = layout, layout.v, layout.K
        self.min_frames, self.max_frames = max(1, min_frames), max_frames
        self.n = 0               # body tokens pushed so far
        self.T: int | None = None  # number of frames, once decided
        self.done = False

    def allowed(self) -> list[tuple[int, int]]:
        if self.done:
            raise RuntimeError("the audio body is complete (<eoa> was emitted)")
        v, K = self.v, self.K
        s, k = divmod(self.n, K)
        eoa, fill = (v.eoa_id, v.eoa_id + 1), (v.fill_id, v.fill_id + 1)
        if self.layout.name == "flatten":
            if k:
                return [v.code_range(k)]
            if s >= self.max_frames:
                return [eoa]
            return [v.code_range(0)] + ([eoa] if s >= self.min_frames else [])
        # delay
        if self.T is not None and s >= self.T + K - 1:
            return [eoa]
        t = s - k
        if t < 0:
            return [fill]
        if k == 0 and self.T is None:
            stop = fill if K > 1 else eoa
            if s >= self.max_frames:
                return [stop]
            return [v.code_range(0)] + ([stop] if s >= self.min_frames else [])
        if self.T is not None and t >= self.T:
            return [fill]
        return [v.code_range(k)]

    def push(self, tok: int) -> None:
        tok = int(tok)
        if not any(lo <= tok < hi for lo, hi in self.allowed()):
            raise ValueError(f"token {tok} is not legal at audio body position {self.n}: {self.allowed()}")
        if tok == self.v.eoa_id:
            self.done = True
            if self.T is None:
                self.T = self.n // self.K
            return
        s, k = divmod(self.n, self.K)
        if self.layout.name == "delay" and k == 0 and self.T is None and tok == self.v.fill_id and s >= 1:
            self.T = s
        self.n += 1
