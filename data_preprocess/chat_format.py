"""The model's chat format, defined once: rendering (generation prompts) and tokenisation with loss masks (SFT).

A tokenizer that brings its own chat template (SmolLM2's ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n``, with
a default system turn when none is given) is used in that format; a tokenizer without one gets ChatMusician's::

    <s>Human: {prompt} </s> Assistant: {answer} </s> Human: ... </s> Assistant: {answer} </s>

(:data:`CHAT_TEMPLATE`; ``<s>``/``</s>`` are the BOS/EOS tokens, a system turn is its text plus a space). tunesmith's
own tokenizers are saved with exactly that template, so for them it is simply "the template" too.

Why one module: SFT data, ``predict.py --with_prompt``, the demo and the benchmarks' chat mode must feed the model
the very ids it was trained on. :class:`ChatFormat` renders with ``tokenizer.apply_chat_template`` (the template
holds any BOS; nothing is added around it) and tokenises the rendered conversation cut at the start of each
answer -- the text before it as text, the rest as its continuation (no second start-of-text ``▁``). So

* :meth:`ChatFormat.prompt_ids` (the generation prompt of a conversation) is always exactly the training ids in
  front of the next answer, and
* training ids == ``tokenizer.apply_chat_template(messages, tokenize=True)`` wherever no BPE token would cross
  the end of a generation prompt. One can with ChatMusician's format: its prompt ends in a space, and a 2000-piece
  ABC SentencePiece vocabulary holds ``▁X`` and ``▁I``, so whole-text tokenisation would train on ``: ▁X`` where
  generation feeds ``: ▁`` (every metadata conversation of music21's corpus: the answers start ``X:1`` / ``It is``).
  The cut keeps ``: ▁ | X`` as the prompt gives it. ChatML's prompt ends in a newline, which byte-level BPE keeps
  apart from the word after it: there the ids are apply_chat_template's.

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
        """Token ids that make the model write the next assistant turn: exactly the training ids before that
        answer (:meth:`encode` of ``messages`` + the answer starts with them)."""
        msgs = as_messages(messages)
        text = self.render(msgs, True)
        if self._backend is None:
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self._encode_texts([text], [self._answer_spans(msgs, text)])[0][0]

    # -------------------------------------------------------------------------------------------- training

    def encode(self, messages: Sequence) -> tuple[list[int], list[int]]:
        """``(ids, loss_mask)`` of one conversation; see the module doc for the mask."""
        return self.encode_batch([messages])[0]

    def encode_batch(self, conversations: Sequence[Sequence]) -> list[tuple[list[int], list[int]]]:
        """:meth:`encode` of many conversations with batch calls of the Rust tokenizer (preprocess's path)."""
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
        return self._encode_texts(texts, spans)

    def _encode_texts(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[tuple[list[int], list[int]]]:
        """Tokenises rendered conversations cut at each answer's start: the text before the first answer as text,
        each piece from an answer on (answer, end-of-turn, the next turns' prompt) as a continuation. Cut there, a
        generation prompt tokenises the same alone as in front of its answer (whole-text tokenisation would merge
        ChatMusician's closing space with the answer's first letter: ``▁X`` where the prompt alone ends in ``▁``);
        the pieces' ids equal the whole text's wherever no token crosses a cut."""
        cont = self._continuation()
        if cont is None:  # a pre-tokenizer that prefixes every split: the whole text at once (module doc)
            return [self._masked(e, sp, 0) for e, sp in
                    zip(self._backend.encode_batch(texts, add_special_tokens=False), spans)]
        heads = [t[:sp[0][0]] if sp else t for t, sp in zip(texts, spans)]
        pieces = [t[a:(sp[j + 1][0] if j + 1 < len(sp) else len(t))] for t, sp in zip(texts, spans)
                  for j, (a, _) in enumerate(sp)]
        fast = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)  # no offsets: ~2x faster
        head_enc = fast(heads, add_special_tokens=False)
        piece_enc = iter(cont.encode_batch(pieces, add_special_tokens=False) if pieces else [])
        out = []
        for h, t, sp in zip(head_enc, texts, spans):
            ids, mask = list(h.ids), [0] * len(h.ids)
            for a, b in sp:
                p_ids, p_mask = self._masked(next(piece_enc), [(0, b - a)], 0)
                ids += p_ids
                mask += p_mask
            out.append((ids, mask))
        return out

    @staticmethod
    def _masked(enc, spans: list[tuple[int, int]], shift: int) -> tuple[list[int], list[int]]:
        """``enc``'s ids and a mask of 1 on the tokens overlapping ``spans`` (characters, ``shift`` subtracted)."""
        ids = enc.ids
        mask = [0] * len(ids)
        for a, b in spans:
            a, b = a - shift, b - shift
            first, last = enc.char_to_token(a), enc.char_to_token(b - 1)
            if first is None or last is None:  # a character without a token (dropped by a normalizer)
                hit = [j for j, (s, e) in enumerate(enc.offsets) if s < b and max(e, s + 1) > a]
                first, last = (hit[0], hit[-1]) if hit else (0, -1)
            mask[first:last + 1] = [1] * (last + 1 - first)
        return ids, mask

    def _continuation(self):
        """The backend tokenizer as it tokenises text in the middle of a text: without a start-of-text prefix
        (Metaspace's ``prepend_scheme="first"`` becomes ``"never"``; tunesmith's SentencePiece tokenizers have
        it). None where a prefix goes on every split (``"always"``, ByteLevel's ``add_prefix_space``, a
        ``Prepend`` normalizer), which cut pieces cannot reproduce."""
        if not hasattr(self, "_cont"):
            import json

            def nodes(state):
                stack = [json.loads(state)] if state else []
                while stack:
                    n = stack.pop()
                    if isinstance(n, dict):
                        yield n
                        stack += list(n.values())
                    elif isinstance(n, list):
                        stack += n

            bt = self._backend
            pre = list(nodes(bt.pre_tokenizer.__getstate__() if bt.pre_tokenizer is not None else None))
            norm = list(nodes(bt.normalizer.__getstate__() if bt.normalizer is not None else None))
            meta = [n for n in pre if n.get("type") == "Metaspace"]
            if (any(n.get("type") == "Prepend" for n in norm) or any(n.get("type") == "ByteLevel"
                    and n.get("add_prefix_space") for n in pre)
                    or any(n.get("prepend_scheme", "always" if n.get("add_prefix_space", True) else "never")
                           == "always" for n in meta)):
                self._cont = None
            elif not any(n.get("prepend_scheme") == "first" for n in meta):
                self._cont = bt  # nothing is prefixed: pieces tokenise as they do inside the text
            else:
                from tokenizers import Tokenizer

                spec = json.loads(bt.to_str())
                spec["pre_tokenizer"] = _never_prepend(spec["pre_tokenizer"])
                self._cont = Tokenizer.from_str(json.dumps(spec))
        return self._cont

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


def _never_prepend(node):
    """A pre-tokenizer spec (JSON) with every Metaspace's ``prepend_scheme`` ``"first"`` set to ``"never"``."""
    if isinstance(node, dict):
        node = {k: _never_prepend(v) for k, v in node.items()}
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            node["prepend_scheme"] = "never"
    elif isinstance(node, list):
        node = [_never_prepend(v) for v in node]
    return node
