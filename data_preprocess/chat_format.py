"""The model's chat format, defined once: rendering (generation prompts) and tokenisation with loss masks (SFT).

A tokenizer that brings its own chat template (SmolLM2's ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n``, with
a default system turn when none is given) is used in that format; a tokenizer without one gets ChatMusician's::

    <s>Human: {prompt} </s> Assistant: {answer} </s> Human: ... </s> Assistant: {answer} </s>

(:data:`CHAT_TEMPLATE`; ``<s>``/``</s>`` are the BOS/EOS tokens, a system turn is its text plus a space). tunesmith's
own tokenizers are saved with exactly that template, so for them it is simply "the template" too.

Why one module: SFT data, ``predict.py --with_prompt``, the demo and the benchmarks' chat mode must feed the model
the very ids it was trained on. :class:`ChatFormat` renders with ``tokenizer.apply_chat_template`` and tokenises the
whole rendered conversation in one go, so

* training ids == ``tokenizer.apply_chat_template(messages, tokenize=True)`` (the template holds any BOS; nothing
  is added around it), and
* :meth:`ChatFormat.prompt_ids` (the generation prompt of a conversation) is a prefix of the training ids of that
  conversation continued by the answer -- except where one BPE token straddles the end of the generation prompt
  and the answer's first character (ChatMusician's prompt ends in a space, and a SentencePiece vocabulary may hold
  ``▁A``: the training text then has ``▁A`` where the prompt ends in ``▁``; ChatML's prompt ends in a newline, which
  byte-level BPE never merges into a word).

Loss mask: 1 on each assistant answer -- its content through the template's end-of-turn token (``</s>`` /
``<|im_end|>``; ChatMusician's space before ``</s>`` included) -- 0 on system/user turns, role headers and the
generation prompt (``Assistant: `` / ``<|im_start|>assistant\\n``) and whatever follows the end-of-turn token.
Answer spans are found in characters: rendering ``messages[:i]`` with the generation prompt gives where answer
``i`` starts, the end-of-turn token after its content ends it; the fast tokenizer's offsets map spans to tokens (a
token overlapping a span is a target).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from data_preprocess.hub import ArgumentError

# ChatMusician's SFT format, tunesmith's template for tokenizers without one. The spaces around </s> are literal
# text; bos_token/eos_token are the tokenizer's BOS/EOS (rendered as their token strings, tokenised to their ids).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'Human: ' + m['content'] + ' ' + eos_token + ' ' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + ' ' + eos_token + ' ' }}"
    "{% elif m['role'] == 'system' %}{{ m['content'] + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
# What tokenizers saved by earlier tunesmith versions carry: the same format without the leading BOS (SFT data
# always began with BOS, added outside the template). Treated as CHAT_TEMPLATE, so those models get their BOS.
LEGACY_CHAT_TEMPLATES = (CHAT_TEMPLATE[len("{{ bos_token }}"):],)

_PROBE = "\x01tunesmith-probe\x02"


def as_messages(turns: Iterable) -> list[dict]:
    """``[{"role", "content"}]`` from such dicts or from ``(role, content)`` pairs (sft.Conversation.turns)."""
    return [dict(t) if isinstance(t, dict) else {"role": t[0], "content": t[1]} for t in turns]


def _template_of(tokenizer) -> str:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):  # named templates: the default one
        t = t.get("default")
    if not t or t in LEGACY_CHAT_TEMPLATES:
        return CHAT_TEMPLATE
    return t


def ensure_chat_template(tokenizer) -> None:
    """Gives ``tokenizer`` the template :class:`ChatFormat` uses for it (ChatMusician's when it has none or an old
    tunesmith one), so a saved copy and ``apply_chat_template`` on it render the same format."""
    tokenizer.chat_template = _template_of(tokenizer)


class ChatFormat:
    """Renders conversations and encodes them with loss masks, in the format of ``tokenizer``'s chat template.

    ``name``: ``chatmusician`` (tunesmith's format), ``chatml`` (``<|im_start|>`` templates) or ``template``
    (any other template). ``eot`` / ``eot_id``: the token closing an assistant turn; ``answer_suffix``: the
    template's text between an answer and ``eot`` (a reply's text ends before it); ``stop_ids``: the ids that end
    generation (EOS, plus ``eot_id`` when it differs)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = _template_of(tokenizer)
        self.name = ("chatmusician" if self.template == CHAT_TEMPLATE else
                     "chatml" if "<|im_start|>" in self.template else "template")
        self._where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        text = self.render(probe)
        after = text[text.index(_PROBE) + len(_PROBE):] if _PROBE in text else ""
        specials = set(getattr(tokenizer, "all_special_tokens", []))
        specials |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                     if getattr(t, "special", False)}
        found = [(after.find(s), -len(s), s) for s in specials if s and s in after]
        if not found:
            raise ArgumentError(f"tokenizer {self._where}: its chat template closes an assistant turn with no special "
                                f"token (after the answer comes {after[:40]!r}), so generation could not stop. Fix: "
                                "a template whose assistant turns end in EOS or an end-of-turn token, or remove the "
                                "template (tunesmith then uses ChatMusician's format)")
        self.eot = min(found)[2]
        self.answer_suffix = after[:after.index(self.eot)]  # ChatMusician: " " (before </s>); ChatML: ""
        self.eot_id = tokenizer.convert_tokens_to_ids(self.eot)
        eos = tokenizer.eos_token_id
        self.stop_ids = [i for i in dict.fromkeys([eos, self.eot_id]) if i is not None]
        self._backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None

    def __repr__(self) -> str:
        return f"ChatFormat({self.name}, eot={self.eot!r})"

    # -------------------------------------------------------------------------------------------- rendering

    def render(self, messages: Sequence, add_generation_prompt: bool = False) -> str:
        """The conversation as text (``add_generation_prompt``: with the assistant turn opened, for generation)."""
        return self.tokenizer.apply_chat_template(as_messages(messages), chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, messages: Sequence) -> list[int]:
        """Token ids that make the model write the next assistant turn (what training saw before an answer)."""
        text = self.render(messages, True)
        if self._backend is None:
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self._backend.encode(text, add_special_tokens=False).ids

    # -------------------------------------------------------------------------------------------- training

    def encode(self, messages: Sequence) -> tuple[list[int], list[int]]:
        """``(ids, loss_mask)`` of one conversation; see the module doc for the mask."""
        return self.encode_batch([messages])[0]

    def encode_batch(self, conversations: Sequence[Sequence]) -> list[tuple[list[int], list[int]]]:
        """:meth:`encode` of many conversations with one batch call of the Rust tokenizer (preprocess's path)."""
        if self._backend is None:
            raise ArgumentError(f"tokenizer {self._where}: chat data needs a fast (Rust) tokenizer for its token "
                                "offsets. Fix: a tokenizer dir with tokenizer.json (tunesmith's train_tokenizer "
                                "writes one)")
        texts, spans = [], []
        for conv in conversations:
            msgs = as_messages(conv)
            text = self.render(msgs)
            texts.append(text)
            spans.append(self._answer_spans(msgs, text))
        out = []
        for enc, sp in zip(self._backend.encode_batch(texts, add_special_tokens=False), spans):
            ids = enc.ids
            mask = [0] * len(ids)
            for a, b in sp:
                first, last = enc.char_to_token(a), enc.char_to_token(b - 1)
                if first is None or last is None:  # a character without a token (dropped by a normalizer)
                    hit = [j for j, (s, e) in enumerate(enc.offsets) if s < b and max(e, s + 1) > a]
                    first, last = (hit[0], hit[-1]) if hit else (0, -1)
                mask[first:last + 1] = [1] * (last + 1 - first)
            out.append((ids, mask))
        return out

    def _answer_spans(self, msgs: list[dict], text: str) -> list[tuple[int, int]]:
        """Character spans ``[start, end)`` of the assistant answers in ``text`` (content .. end of eot)."""
        spans = []
        pos = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            if i:
                head = self.render(msgs[:i], True)
                if not text.startswith(head):
                    raise ArgumentError(f"tokenizer {self._where}: its chat template renders the conversation before "
                                        f"assistant message {i} differently from the whole conversation, so the "
                                        "answer cannot be located. Fix: a template that renders earlier turns the "
                                        "same way whatever follows (or remove it: tunesmith then uses ChatMusician's)")
                start = len(head)
            else:  # an opening assistant message: no generation prompt to render before it
                start = text.find(m["content"], pos) if m["content"] else pos
            content = m["content"]
            if not text.startswith(content, start):
                content = content.strip()      # templates that trim the content
                start = text.find(content, start) if content else start
            if start < 0 or not text.startswith(content, start):
                raise ArgumentError(f"tokenizer {self._where}: its chat template changes the text of assistant "
                                    f"message {i}, so its loss mask cannot be placed. Fix: a template that inserts "
                                    "the content unchanged")
            end = text.find(self.eot, start + len(content))
            if end < 0:
                raise ArgumentError(f"tokenizer {self._where}: no {self.eot!r} after assistant message {i} in its "
                                    "chat template's rendering; generation could not learn to stop")
            pos = end + len(self.eot)
            spans.append((start, pos))
        return spans
