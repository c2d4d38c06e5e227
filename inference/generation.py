"""Text generation for chat and batch prediction: prompts from the tokenizer's chat template, sampling
with ChatMusician's defaults, KV cache, stop at EOS, token streaming through a callback, and optionally
ABC-constrained decoding (``constrain="abc"``: inference/abc_constraint.py).

Used by inference/predict.py (terminal chat, batch files) and inference/demo.py (web page).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
from transformers import LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

CONSTRAIN_CHOICES = ("none", "abc")


@dataclass
class SamplingConfig:
    """Decoding settings; defaults are ChatMusician's demo settings. ``temperature <= 0`` means greedy."""

    temperature: float = 0.2
    top_k: int = 40
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    max_new_tokens: int = 1536
    seed: int | None = None
    # KV cache: dynamic (grows per token; HF's default) | static (preallocated for prompt + max_new_tokens; on CUDA
    # transformers also compiles the decode step). Static pays off for batched decoding (benchmarks/RESULTS.md).
    cache: str = "dynamic"

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

    def generate_kwargs(self, tokenizer) -> dict:
        kw = {"max_new_tokens": int(self.max_new_tokens), "use_cache": True,
                  "repetition_penalty": float(self.repetition_penalty),
                  "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        if self.cache == "static":
            kw["cache_implementation"] = "static"
        if self.temperature and self.temperature > 0:
            kw.update(do_sample=True, temperature=float(self.temperature), top_k=int(self.top_k),
                      top_p=float(self.top_p))
        else:
            kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        return kw


def build_prompt(tokenizer, messages: list[dict], with_prompt: bool = True) -> str:
    """The text fed to the model for a conversation.

    ``with_prompt``: the tokenizer's chat template (tunesmith's is ChatMusician's
    ``Human: ... </s> Assistant: ... </s> `` format) with the assistant turn opened. Without it, the raw
    text of the last user message is continued (e.g. an ABC header to complete, as in pretraining)."""
    if not with_prompt:
        return messages[-1]["content"] if messages else ""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # no template saved with the tokenizer: ChatMusician's format by hand
    eos = tokenizer.eos_token or "</s>"
    parts = [f"Human: {m['content']} {eos} " if m["role"] == "user" else f"Assistant: {m['content']} {eos} "
             for m in messages if m["role"] in ("user", "assistant")]
    return "".join(parts) + "Assistant: "


class CallbackStreamer(BaseStreamer):
    """Calls ``callback(text_piece)`` as tokens are generated (batch size 1).

    The pieces concatenate exactly to the decoded reply. Text is re-decoded from all new ids at each
    step (so SentencePiece spacing is right), but a trailing run of byte-fallback tokens (``<0xE2>``...)
    is held back: the decoder turns a run of bytes into characters only once it is complete (an
    unfinished run decodes to U+FFFD per byte, and even a finished character is re-read when more bytes
    join its run), so text is emitted only up to the last non-byte token."""

    def __init__(self, tokenizer, callback: Callable[[str], None], skip_prompt: bool = True):
        self.tokenizer, self.callback = tokenizer, callback
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
        self._emit(self.ids[:k])

    def end(self):
        self._emit(self.ids)

    def _byte_token(self, i: int) -> bool:
        if i not in self._is_byte:
            piece = self.tokenizer.convert_ids_to_tokens(i)
            self._is_byte[i] = isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x")
        return self._is_byte[i]

    def _emit(self, ids: list[int]):
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            piece, self.emitted = text[len(self.emitted):], text
            self.callback(piece)


def constraint_kwargs(tokenizer, prompts: list[str], cfg: SamplingConfig, constrain: str = "none",
                      fields: list[dict] | None = None):
    """(extra ``generate`` kwargs, the processor or None) for ``constrain`` (none | abc). ``fields``: the
    header fields each prompt asks for (None: extracted from each prompt text; pass the user's own
    message's fields when the prompt is chat-templated). Raises ConstraintError (a ValueError) for an
    impossible request or a tokenizer that cannot spell ABC."""
    if constrain in (None, "none"):
        return {}, None
    if constrain != "abc":
        raise ValueError(f"constrain={constrain!r}: choose one of {CONSTRAIN_CHOICES}")
    from inference.abc_constraint import constraint_processor

    greedy = not (cfg.temperature and cfg.temperature > 0)
    proc = constraint_processor(tokenizer, prompts, fields, greedy=greedy, temperature=cfg.temperature,
                                top_k=cfg.top_k, top_p=cfg.top_p)
    return {"logits_processor": LogitsProcessorList([proc])}, proc


def _seed(seed: int | None):
    if seed is not None:
        from transformers import set_seed

        set_seed(int(seed))


@torch.inference_mode()
def generate(model, tokenizer, prompt: str, cfg: SamplingConfig | None = None,
             on_text: Callable[[str], None] | None = None, device: torch.device | None = None,
             constrain: str = "none", fields: dict | None = None) -> dict:
    """Generates one reply to ``prompt`` (already formatted). ``on_text`` receives streamed pieces.
    ``constrain="abc"``: the reply is an ABC tune with the header ``fields`` asked for (see
    :func:`constraint_kwargs`).

    Returns ``{"output", "prompt_tokens", "new_tokens", "stopped_at_eos"}`` (+ ``"constraint"``: fields,
    satisfied, stop reason, when constrained)."""
    cfg = cfg or SamplingConfig()
    device = device or next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    extra, proc = constraint_kwargs(tokenizer, [prompt], cfg, constrain, None if fields is None else [fields])
    _seed(cfg.seed)
    streamer = CallbackStreamer(tokenizer, on_text) if on_text else None
    out = model.generate(**enc, streamer=streamer, **cfg.generate_kwargs(tokenizer), **extra)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    stopped = eos in new
    if stopped:
        new = new[: new.index(eos) + 1]
    rec = {"output": tokenizer.decode(new, skip_special_tokens=True),
           "prompt_tokens": int(enc["input_ids"].shape[1]), "new_tokens": len(new), "stopped_at_eos": stopped}
    if proc is not None:
        rec["constraint"] = proc.report(0, rec["output"], ended_at_eos=stopped)
    return rec


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[str], cfg: SamplingConfig | None = None,
                   device: torch.device | None = None, constrain: str = "none",
                   fields: list[dict] | None = None) -> list[dict]:
    """Generates replies for several prompts at once, left-padded (padding never sits between a prompt
    and its continuation). Same record per prompt as :func:`generate` (``fields``: one dict per prompt)."""
    cfg = cfg or SamplingConfig()
    device = device or next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side
    extra, proc = constraint_kwargs(tokenizer, prompts, cfg, constrain, fields)
    _seed(cfg.seed)
    out = model.generate(**enc, **cfg.generate_kwargs(tokenizer), **extra)
    width = enc["input_ids"].shape[1]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    recs = []
    for i in range(len(prompts)):
        new = out[i, width:].tolist()
        stopped = eos in new
        new = new[: new.index(eos) + 1] if stopped else [t for t in new if t != pad]
        recs.append({"output": tokenizer.decode(new, skip_special_tokens=True),
                     "prompt_tokens": int(enc["attention_mask"][i].sum()), "new_tokens": len(new),
                     "stopped_at_eos": stopped})
        if proc is not None:
            recs[-1]["constraint"] = proc.report(i, recs[-1]["output"], ended_at_eos=stopped)
    return recs


def trim_history(tokenizer, messages: list[dict], max_prompt_tokens: int, with_prompt: bool = True) -> list[dict]:
    """Drops the oldest turns (user+assistant pairs) until the prompt fits ``max_prompt_tokens``;
    the newest user message is always kept."""
    msgs = list(messages)
    while len(msgs) > 1 and len(tokenizer(build_prompt(tokenizer, msgs, with_prompt)).input_ids) > max_prompt_tokens:
        msgs = msgs[2:] if len(msgs) > 2 else msgs[1:]
    return msgs
