"""Text generation for chat and batch prediction: sampling with ChatMusician's defaults, KV cache, stop at EOS
or the chat format's end-of-turn token, token streaming through a callback, and optionally ABC-constrained decoding
(``constrain="abc"``: inference/abc_constraint.py). Chat prompts are token ids from
:class:`data_preprocess.chat_format.ChatFormat` (``prompt_ids``: exactly what SFT trained on before an answer);
a plain string prompt is raw text to continue.

Used by inference/predict.py (terminal chat, batch files) and inference/demo.py (web page).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
from transformers import LogitsProcessorList
from transformers.generation import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from data_preprocess.chat_format import ChatFormat
from inference.abc_constraint import constraint_processor

CONSTRAIN_CHOICES = ("none", "abc")


@dataclass
class SamplingConfig:
    """Decoding settings; defaults are ChatMusician's demo settings. ``temperature <= 0`` means greedy."""

    temperature: float = 0.2
    """softmax temperature; <= 0 = greedy decoding"""
    top_k: int = 40
    """sample among the k most likely tokens (0 = no cap)"""
    top_p: float = 0.9
    """nucleus sampling: the smallest set of tokens whose probability reaches p"""
    repetition_penalty: float = 1.1
    """> 1 makes tokens already in the text less likely (HF's CTRL-style penalty)"""
    max_new_tokens: int = 1536
    """tokens generated at most per reply"""
    seed: int | None = None
    """sampling seed (None = not seeded)"""
    cache: str = "dynamic"
    """KV cache: dynamic (grows per token; HF's default) | static (preallocated for prompt + max_new_tokens; on CUDA
    transformers also compiles the decode step) -- static pays off for batched decoding (docs/speed.md)"""

    def __post_init__(self):
        problems = []
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.cache not in ("dynamic", "static"):
            problems.append(f"cache={self.cache!r} must be dynamic or static")
        if problems:
            raise ValueError("bad sampling settings: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> SamplingConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_dict(self) -> dict:
        return asdict(self)

    def generate_kwargs(self, tokenizer, stop_ids: list[int] | None = None) -> dict:
        """``model.generate`` keywords; ``stop_ids``: the ids that end a reply (default: EOS)."""
        stop = stop_ids[0] if stop_ids and len(stop_ids) == 1 else (stop_ids or tokenizer.eos_token_id)
        kw = {"max_new_tokens": int(self.max_new_tokens), "use_cache": True,
                  "repetition_penalty": float(self.repetition_penalty),
                  "eos_token_id": stop, "pad_token_id": tokenizer.pad_token_id}
        if self.cache == "static":
            kw["cache_implementation"] = "static"
        if self.temperature and self.temperature > 0:
            kw.update(do_sample=True, temperature=float(self.temperature), top_k=int(self.top_k),
                      top_p=float(self.top_p))
        else:
            kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        return kw


class CallbackStreamer(BaseStreamer):
    """Calls ``callback(text_piece)`` as tokens are generated (batch size 1).

    The pieces concatenate exactly to the reply (:func:`reply_text`). Text is re-decoded from all new ids at
    each step (so SentencePiece spacing is right), but a trailing run of byte-fallback tokens (``<0xE2>``...)
    is held back: the decoder turns a run of bytes into characters only once it is complete (an
    unfinished run decodes to U+FFFD per byte, and even a finished character is re-read when more bytes
    join its run), so text is emitted only up to the last non-byte token. So is a trailing answer suffix
    (ChatMusician's space before ``</s>``) until the next token shows whether the reply ends there."""

    def __init__(self, tokenizer, callback: Callable[[str], None], skip_prompt: bool = True,
                 fmt: ChatFormat | None = None):
        self.tokenizer, self.callback = tokenizer, callback
        self.fmt = fmt or ChatFormat(tokenizer)
        self.ids: list[int] = []
        self.emitted = ""
        self._prompt_pending = skip_prompt
        self._is_byte: dict[int, bool] = {}

    def put(self, value: torch.Tensor):
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("CallbackStreamer supports batch size 1 only")
            value = value[0]
        if self._prompt_pending:  # generate() first hands over the prompt ids
            self._prompt_pending = False
            return
        self.ids.extend(value.tolist())
        k = len(self.ids)
        while k > 0 and self._byte_token(self.ids[k - 1]):
            k -= 1
        self._emit(self.ids[:k], final=False)

    def end(self):
        self._emit(_cut_at_stop(self.ids, set(self.fmt.stop_ids))[0], final=True)

    def _byte_token(self, i: int) -> bool:
        if i not in self._is_byte:
            piece = self.tokenizer.convert_ids_to_tokens(i)
            self._is_byte[i] = isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x")
        return self._is_byte[i]

    def _emit(self, ids: list[int], final: bool):
        text = reply_text(self.tokenizer, self.fmt, ids, final)
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            piece, self.emitted = text[len(self.emitted):], text
            self.callback(piece)


def constraint_kwargs(tokenizer, prompts: list[str], cfg: SamplingConfig, constrain: str = "none",
                      fields: list[dict] | None = None, eos_token_id: int | None = None):
    """(extra ``generate`` kwargs, the processor or None) for ``constrain`` (none | abc). ``prompts``: each
    prompt's text; ``fields``: the header fields each prompt asks for (None: extracted from each prompt text;
    pass the user's own message's fields when the prompt is chat-formatted); ``eos_token_id``: the token that
    ends a tune (default EOS; a chat reply's end-of-turn token). Raises ConstraintError (a ValueError) for an
    impossible request or a tokenizer that cannot spell ABC."""
    if constrain in (None, "none"):
        return {}, None
    if constrain != "abc":
        raise ValueError(f"constrain={constrain!r}: choose one of {CONSTRAIN_CHOICES}")
    greedy = not (cfg.temperature and cfg.temperature > 0)
    proc = constraint_processor(tokenizer, prompts, fields, greedy=greedy, temperature=cfg.temperature,
                                top_k=cfg.top_k, top_p=cfg.top_p, eos_token_id=eos_token_id,
                                max_new_tokens=cfg.max_new_tokens)
    return {"logits_processor": LogitsProcessorList([proc])}, proc


def _end_id(tokenizer, fmt: ChatFormat, prompt: str | list[int]) -> int:
    """The token a reply to ``prompt`` ends with: the format's end-of-turn token after a chat prompt (ids),
    EOS after raw text."""
    return tokenizer.eos_token_id if isinstance(prompt, str) else fmt.eot_id


def _seed(seed: int | None):
    if seed is not None:
        from transformers import set_seed

        set_seed(int(seed))


class _AskStop(StoppingCriteria):
    """Ends generation when ``ask()`` returns true (checked once per generated token)."""

    def __init__(self, ask: Callable[[], bool]):
        self.ask = ask

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.ask()), dtype=torch.bool, device=input_ids.device)


def reply_text(tokenizer, fmt: ChatFormat, ids: list[int], final: bool = True) -> str:
    """The text of reply ``ids``: special tokens dropped, and so is the format's answer suffix (ChatMusician's
    space before ``</s>``) before a stop token -- the reply is the answer as training saw it, so it goes back into
    the chat history unchanged. While the reply may go on (``final`` False) a trailing suffix is held back."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    sfx = fmt.answer_suffix
    stopped = bool(ids) and ids[-1] in fmt.stop_ids
    if sfx and (stopped or not final) and text.endswith(sfx):
        text = text[:-len(sfx)]
    return text


def _prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """Chat prompts come as ids (ChatFormat.prompt_ids); a string is raw text, tokenised as such."""
    return list(prompt) if not isinstance(prompt, str) else tokenizer(prompt).input_ids


def _prompt_text(tokenizer, prompt: str | list[int]) -> str:
    """The text the ABC constraint reads a prompt as (it continues a prompt that ends inside a tune)."""
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


def _cut_at_stop(new: list[int], stop: set[int]) -> tuple[list[int], bool]:
    """The reply up to and including its first stop token; whether there was one."""
    for j, t in enumerate(new):
        if t in stop:
            return new[:j + 1], True
    return new, False


@torch.inference_mode()
def generate(model, tokenizer, prompt: str | list[int], cfg: SamplingConfig | None = None,
             on_text: Callable[[str], None] | None = None, device: torch.device | None = None,
             should_stop: Callable[[], bool] | None = None, constrain: str = "none",
             fields: dict | None = None) -> dict:
    """Generates one reply to ``prompt`` (chat prompt ids, or raw text). ``on_text`` receives streamed pieces;
    ``should_stop()`` is asked after every token and ends generation when true (the demo: the client went
    away, or the server is shutting down). ``constrain="abc"``: the reply is an ABC tune with the header
    ``fields`` asked for (see :func:`constraint_kwargs`).

    Returns ``{"output", "prompt_tokens", "new_tokens", "stopped_at_eos"}`` (``stopped_at_eos``: at EOS or the
    end-of-turn token; + ``"constraint"``: fields, satisfied, stop reason, when constrained)."""
    cfg = cfg or SamplingConfig()
    device = device or next(model.parameters()).device
    ids = torch.tensor([_prompt_ids(tokenizer, prompt)], device=device)
    fmt = ChatFormat(tokenizer)
    extra, proc = constraint_kwargs(tokenizer, [_prompt_text(tokenizer, prompt)], cfg, constrain,
                                    None if fields is None else [fields], eos_token_id=_end_id(tokenizer, fmt, prompt))
    _seed(cfg.seed)
    streamer = CallbackStreamer(tokenizer, on_text, fmt=fmt) if on_text else None
    if should_stop:
        extra["stopping_criteria"] = StoppingCriteriaList([_AskStop(should_stop)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                         **cfg.generate_kwargs(tokenizer, fmt.stop_ids), **extra)
    new, stopped = _cut_at_stop(out[0, ids.shape[1]:].tolist(), set(fmt.stop_ids))
    rec = {"output": reply_text(tokenizer, fmt, new),
           "prompt_tokens": int(ids.shape[1]), "new_tokens": len(new), "stopped_at_eos": stopped}
    if proc is not None:
        rec["constraint"] = proc.report(0, rec["output"], ended_at_eos=stopped)
    return rec


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[str] | list[list[int]], cfg: SamplingConfig | None = None,
                   device: torch.device | None = None, constrain: str = "none",
                   fields: list[dict] | None = None) -> list[dict]:
    """Generates replies for several prompts at once, left-padded (padding never sits between a prompt
    and its continuation). Same record per prompt as :func:`generate` (``fields``: one dict per prompt)."""
    cfg = cfg or SamplingConfig()
    device = device or next(model.parameters()).device
    rows = [_prompt_ids(tokenizer, p) for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    fmt = ChatFormat(tokenizer)
    ends = {_end_id(tokenizer, fmt, p) for p in prompts}
    extra, proc = constraint_kwargs(tokenizer, [_prompt_text(tokenizer, p) for p in prompts], cfg, constrain, fields,
                                    eos_token_id=ends.pop() if len(ends) == 1 else tokenizer.eos_token_id)
    _seed(cfg.seed)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         **cfg.generate_kwargs(tokenizer, fmt.stop_ids), **extra)
    recs = []
    for i, r in enumerate(rows):
        new, stopped = _cut_at_stop(out[i, width:].tolist(), set(fmt.stop_ids))
        if not stopped:
            new = [t for t in new if t != pad]
        recs.append({"output": reply_text(tokenizer, fmt, new),
                     "prompt_tokens": len(r), "new_tokens": len(new), "stopped_at_eos": stopped})
        if proc is not None:
            recs[-1]["constraint"] = proc.report(i, recs[-1]["output"], ended_at_eos=stopped)
    return recs


def trim_history(fmt: ChatFormat, messages: list[dict], max_prompt_tokens: int) -> list[dict]:
    """Drops the oldest turns (user+assistant pairs) until the chat prompt fits ``max_prompt_tokens``;
    a leading system message and the newest user message are always kept."""
    head = list(messages[:1]) if messages and messages[0]["role"] == "system" else []
    body = list(messages[len(head):])
    while len(body) > 1 and len(fmt.prompt_ids(head + body)) > max_prompt_tokens:
        body = body[2:] if len(body) > 2 else body[1:]
    return head + body
