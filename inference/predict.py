"""Chat with a trained model in the terminal, or run it over a file of instructions.

    # terminal chat: multi-turn (history kept), tokens streamed; /reset clears the history,
    # /quit or an empty line ends
    python inference/predict.py --base_model runs/x/merged --interactive --with_prompt
    python inference/predict.py --base_model runs/x/base_model --lora_model runs/x/final --interactive --with_prompt

    # batch: one instruction per line (or JSONL with an "instruction"/"input"/"prompt" field)
    python inference/predict.py --base_model M --data_file prompts.txt --predictions_file out.json --render out/abc

``--with_prompt`` wraps input in the model's chat format (:mod:`data_preprocess.chat_format`: the tokenizer's
chat template, e.g. ChatML, else ChatMusician's ``Human: ... </s> Assistant: ``), as token ids identical to what
SFT trained on; without it the raw text is continued (e.g. an ABC header).
Sampling defaults are ChatMusician's: temperature 0.2, top_k 40, top_p 0.9, repetition_penalty 1.1,
max_new_tokens 1536. Generation uses the KV cache and stops at EOS or the format's end-of-turn token (pad != eos).

``--constrain abc`` makes every reply an ABC tune that carries the header fields the instruction asks for
("a jig in D major" -> R:jig, K:D) and whose bars keep time (inference/abc_constraint.py); each
prediction then gets a ``"constraint"`` record (fields asked, satisfied, stop reason).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python inference/predict.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_preprocess.chat_format import ChatFormat
from data_preprocess.hub import ArgumentError, exit_on_argument_error
from inference.abc_constraint import ConstraintError, extract_fields, validate_fields
from inference.abc_extract import extract_abc
from inference.audio import main as audio_main
from inference.cli_config import parse_with_config
from inference.generation import (
    CONSTRAIN_CHOICES,
    SamplingConfig,
    generate,
    generate_batch,
    trim_history,
)
from inference.loading import load_model
from inference.render import render_text
from training.hf_io import ModelPathError, resolve_model_path
from training.oom import is_out_of_memory, out_of_memory_summary

INPUT_FIELDS = ("instruction", "input", "prompt", "text")


def add_model_args(ap: argparse.ArgumentParser):
    ap.add_argument("--base_model", "--model", dest="base_model", required=True,
                    help="HF model dir (a merged model, or the base of --lora_model) or hub id")
    ap.add_argument("--lora_model", default=None, help="PEFT adapter dir (e.g. OUTPUT_DIR/final of a LoRA run)")
    ap.add_argument("--tokenizer_path", default=None, help="default: the adapter dir if it has one, else the model")
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="auto: bf16 on CUDA (fp16 on older GPUs), fp32 on CPU")
    ap.add_argument("--trust_remote_code", action="store_true", help="allow model code from the model dir (off: safe)")


def add_sampling_args(ap: argparse.ArgumentParser):
    d = SamplingConfig()
    g = ap.add_argument_group("sampling (ChatMusician defaults)")
    g.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    g.add_argument("--top_k", type=int, default=d.top_k)
    g.add_argument("--top_p", type=float, default=d.top_p)
    g.add_argument("--repetition_penalty", type=float, default=d.repetition_penalty)
    g.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
    g.add_argument("--seed", type=int, default=None, help="fixes sampling (each reply re-seeded with it)")
    g.add_argument("--cache", choices=["dynamic", "static"], default=d.cache,
                   help="KV cache: static preallocates prompt + max_new_tokens (faster batched decoding)")


def add_constrain_arg(ap: argparse.ArgumentParser):
    ap.add_argument("--constrain", choices=CONSTRAIN_CHOICES, default="none",
                    help="abc: constrain replies to an ABC tune with the asked header fields and bars that keep time")


def prompt_fields(a, text: str) -> dict | None:
    """The header fields a user message asks for, when ``--constrain abc`` (None otherwise)."""
    if getattr(a, "constrain", "none") != "abc":
        return None
    return extract_fields(text)


def request_fields(a, items: list[dict]) -> list[dict | None]:
    """Each instruction's constrained fields (``--constrain abc``); an impossible request raises
    ConstraintError naming its file and line."""
    fields = [prompt_fields(a, it["input"]) for it in items]
    if a.constrain == "abc":
        for it, f in zip(items, fields):
            try:
                validate_fields(f)
            except ConstraintError as e:
                raise ConstraintError(f"{a.data_file}:{it['line']}: {e}") from None
    return fields


def sampling_from_args(a) -> SamplingConfig:
    try:
        return SamplingConfig(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                              repetition_penalty=a.repetition_penalty, max_new_tokens=a.max_new_tokens, seed=a.seed,
                              cache=a.cache)
    except ValueError as e:
        raise ArgumentError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Generate with a tunesmith model: terminal chat or batch file.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", help="YAML/JSON file of these options (flags override it)")
    add_model_args(ap)
    mode = ap.add_argument_group("mode")
    mode.add_argument("--audio", action="store_true", help="text-to-audio with a codec-token model; the other flags "
                      "go to inference.audio (see python -m inference.audio --help)")
    mode.add_argument("--interactive", action="store_true", help="terminal chat")
    mode.add_argument("--with_prompt", action="store_true", help="use the chat template (else raw continuation)")
    mode.add_argument("--data_file", help="batch input: one instruction per line, or .jsonl/.json records")
    mode.add_argument("--input_field", default=None, help=f"JSONL field with the instruction (default: first of {INPUT_FIELDS})")
    mode.add_argument("--predictions_file", default="predictions.json", help="batch output JSON")
    mode.add_argument("--batch_size", type=int, default=8)
    mode.add_argument("--render", metavar="DIR", default=None, help="extract the ABC of each reply and render it here")
    mode.add_argument("--no_wav", action="store_true", help="with --render: skip audio synthesis (faster)")
    mode.add_argument("--chat_log", default=None, help="interactive: append every turn (prompt, reply, counts) as JSONL")
    add_constrain_arg(mode)
    add_sampling_args(ap)
    return ap


def read_instructions(path: str, input_field: str | None = None) -> list[dict]:
    """Returns ``[{"input": str, "line": n, "record": {...}}]``; a bad line is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise ArgumentError(f"{p}: data file not found")
    items = []
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise ArgumentError(f"--data_file {p}: cannot be read ({e.strerror}). Fix: make it readable") from None
    except UnicodeDecodeError as e:
        raise ArgumentError(f"--data_file {p}: not UTF-8 text (byte {e.start}; UTF-16 or a binary file?). Fix: save it "
                            "as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)") from None
    if "\x00" in text:
        raise ArgumentError(f"--data_file {p}: holds NUL bytes (a binary file?). Fix: pass a UTF-8 text, .json or "
                            ".jsonl file")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArgumentError(f"{p}:{e.lineno}: invalid JSON ({e.msg}); expected a list of records or strings") from None
        if not isinstance(data, list):
            raise ArgumentError(f"{p}: expected a JSON list of records or strings")
        rows = [(i + 1, r) for i, r in enumerate(data)]
    elif p.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ArgumentError(f"{p}:{n}: invalid JSON ({e.msg}); one JSON object per line expected") from None
    else:  # plain text: one instruction per line; a literal "\n" inside a line stands for a newline
        rows = [(n, line.replace("\\n", "\n")) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for n, r in rows:
        if isinstance(r, str):
            items.append({"input": r, "line": n, "record": {}})
            continue
        if not isinstance(r, dict):
            raise ArgumentError(f"{p}:{n}: expected a JSON object or string, got {type(r).__name__}")
        fields = [input_field] if input_field else [f for f in INPUT_FIELDS if f in r]
        if not fields or fields[0] not in r or not isinstance(r[fields[0]], str):
            want = input_field or " / ".join(INPUT_FIELDS)
            raise ArgumentError(f"{p}:{n}: record has no string field {want!r}; pass --input_field NAME")
        items.append({"input": r[fields[0]], "line": n, "record": {k: v for k, v in r.items() if k != fields[0]}})
    if not items:
        raise ArgumentError(f"{p}: no instructions found")
    return items


def render_reply(text: str, out_dir: str | None, stem: str, wav: bool = True) -> dict | None:
    if not out_dir:
        return None
    return render_text(text, out_dir, stem, wav=wav)


def _write_predictions(out: Path, results: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")


def check_predictions_file(predictions_file: str, data_file: str) -> None:
    """Before any model is loaded: the output must not be the input (same real path), a directory, or under
    a path that cannot hold it -- else a one-line :class:`ArgumentError` (results are written only at the end)."""
    out = Path(predictions_file)
    if os.path.realpath(out) == os.path.realpath(data_file):
        raise ArgumentError(f"--predictions_file {out} is the --data_file {data_file}: it would be overwritten. Fix: "
                            "pass another --predictions_file")
    if out.is_dir():
        raise ArgumentError(f"--predictions_file {out}: is a directory. Fix: name a file, e.g. {out / 'predictions.json'}")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent if not out.exists() else out, os.W_OK):
        raise ArgumentError(f"--predictions_file {out}: cannot be written ({parent} is not a writable directory). Fix: "
                            "pass a path in a writable directory")


def run_batch(a, loaded, cfg: SamplingConfig, items: list[dict] | None = None) -> list[dict]:
    from tqdm import tqdm

    items = items if items is not None else read_instructions(a.data_file, a.input_field)
    tok, model = loaded.tokenizer, loaded.model
    fmt = ChatFormat(tok)
    prompts = [fmt.prompt_ids([{"role": "user", "content": it["input"]}]) if a.with_prompt else it["input"]
               for it in items]
    fields = request_fields(a, items)
    results = []
    out = Path(a.predictions_file)
    t0 = time.time()
    with tqdm(total=len(items), desc="generating", unit="prompt") as bar:
        for s in range(0, len(items), a.batch_size):
            try:
                recs = generate_batch(model, tok, prompts[s:s + a.batch_size], cfg, device=loaded.device,
                                      constrain=a.constrain, fields=None if a.constrain == "none"
                                      else fields[s:s + a.batch_size])
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                _write_predictions(out, results)  # what finished is kept
                bar.close()
                print(f"error: out of memory generating prompts {s + 1}-{min(s + a.batch_size, len(items))} of "
                      f"{len(items)} (--batch_size {a.batch_size}, --max_new_tokens {cfg.max_new_tokens}): "
                      f"{out_of_memory_summary(e)}. The {len(results)} finished predictions are in {out}. Fix: a "
                      f"smaller --batch_size, a smaller --max_new_tokens, or --dtype bf16", file=sys.stderr)
                raise SystemExit(3) from None
            for j, r in enumerate(recs):
                it = items[s + j]
                row = {"input": it["input"], "output": r["output"], "abc": extract_abc(r["output"]),
                       "prompt_tokens": r["prompt_tokens"], "new_tokens": r["new_tokens"],
                       "stopped_at_eos": r["stopped_at_eos"], "line": it["line"]}
                if it["record"]:
                    row["record"] = it["record"]
                if "constraint" in r:
                    row["constraint"] = r["constraint"]
                rend = render_reply(r["output"], a.render, f"pred_{s + j:05d}", wav=not a.no_wav)
                if rend is not None:
                    row["render"] = rend
                results.append(row)
            bar.update(len(recs))
    elapsed = time.time() - t0
    _write_predictions(out, results)
    n_new = sum(r["new_tokens"] for r in results)
    n_abc = sum(bool(r["abc"]) for r in results)
    print(f"wrote {len(results)} predictions to {out} ({n_abc} with ABC; {n_new} new tokens in {elapsed:.1f} s, "
          f"{n_new / max(elapsed, 1e-9):.1f} tok/s; sampling {json.dumps(cfg.to_dict())})", file=sys.stderr)
    return results


def _free_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_interactive(a, loaded, cfg: SamplingConfig, stdin=None, stdout=None):
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tok, model = loaded.tokenizer, loaded.model
    fmt = ChatFormat(tok)
    max_pos = getattr(model.config, "max_position_embeddings", 4096)
    budget = max(16, max_pos - cfg.max_new_tokens)
    history: list[dict] = []
    turn = 0
    print("tunesmith chat -- /reset clears the history, /quit or an empty line ends."
          + ("" if a.with_prompt else " (no --with_prompt: each input is continued as raw text, no history)"),
          file=stdout, flush=True)
    log = open(a.chat_log, "a", encoding="utf-8") if a.chat_log else None  # noqa: SIM115 - closed below
    try:
        while True:
            print("\nHuman: ", end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line:  # EOF
                break
            text = line.rstrip("\n").replace("\\n", "\n")
            if not text.strip() or text.strip() == "/quit":
                break
            if text.strip() == "/reset":
                history = []
                print("(history cleared)", file=stdout, flush=True)
                continue
            history.append({"role": "user", "content": text})
            msgs = trim_history(fmt, history, budget) if a.with_prompt else history[-1:]
            if len(msgs) < len(history):
                print(f"(context full: dropped {len(history) - len(msgs)} oldest messages)", file=stdout, flush=True)
                history = msgs
            # the log gets the text, the model its ids (the same tokens)
            prompt = fmt.render(msgs, add_generation_prompt=True) if a.with_prompt else text
            prompt_in = fmt.prompt_ids(msgs) if a.with_prompt else text
            print("Assistant: ", end="", file=stdout, flush=True)
            t0 = time.time()
            try:
                r = generate(model, tok, prompt_in, cfg, on_text=lambda s: print(s, end="", file=stdout, flush=True),
                             device=loaded.device, constrain=a.constrain, fields=prompt_fields(a, text))
            except Exception as e:  # the session survives a reply that does not fit; the turn is dropped
                if isinstance(e, ConstraintError):
                    history.pop()
                    print(f"\n[error: {e} -- this turn is dropped]", file=stdout, flush=True)
                    continue
                if not is_out_of_memory(e):
                    raise
                history.pop()
                _free_cached_memory()
                print(f"\n[out of memory: {out_of_memory_summary(e)} -- this turn is dropped. Try /reset (a shorter "
                      f"history) or a smaller --max_new_tokens (now {cfg.max_new_tokens})]", file=stdout, flush=True)
                continue
            dt = time.time() - t0
            turn += 1
            print(f"\n[turn {turn}: prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens, "
                  f"{r['new_tokens'] / max(dt, 1e-9):.1f} tok/s{', stopped at EOS' if r['stopped_at_eos'] else ''}]",
                  file=stdout, flush=True)
            if "constraint" in r:
                c = r["constraint"]
                print(f"[constraint: fields {json.dumps(c['fields'], ensure_ascii=False)}, "
                      f"{'satisfied' if c['satisfied'] else 'NOT satisfied'}, stop: {c['stop']}]", file=stdout, flush=True)
            history.append({"role": "assistant", "content": r["output"]})
            if not a.with_prompt:
                history = []
            rend = render_reply(r["output"], a.render, f"turn_{turn:03d}", wav=not a.no_wav)
            if rend is not None:
                if rend["note"]:
                    print(f"[render: {rend['note']}]", file=stdout, flush=True)
                for t in rend["tunes"]:
                    paths = ", ".join(t[k] for k in ("midi", "wav", "svg") if t[k])
                    errs = f"; {len(t['errors'])} errors: {t['errors'][0]}" if t["errors"] else ""
                    print(f"[render: {paths or 'nothing'}{errs}]", file=stdout, flush=True)
            if log:
                log.write(json.dumps({"turn": turn, "prompt": prompt, "output": r["output"],
                                      **({"constraint": r["constraint"]} if "constraint" in r else {}),
                                      "prompt_tokens": r["prompt_tokens"], "new_tokens": r["new_tokens"],
                                      "stopped_at_eos": r["stopped_at_eos"], "abc": extract_abc(r["output"]),
                                      "sampling": cfg.to_dict()}, ensure_ascii=False) + "\n")
                log.flush()
    finally:
        if log:
            log.close()
    print("bye", file=stdout, flush=True)


@exit_on_argument_error
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--audio" in argv:  # text-to-audio with a codec-token model (inference/audio.py)
        return audio_main([x for x in argv if x != "--audio"])
    ap = build_parser()
    a = parse_with_config(ap, argv)
    if not a.interactive and not a.data_file:
        ap.error("choose a mode: --interactive (terminal chat) or --data_file FILE (batch)")
    if a.batch_size < 1:
        ap.error("--batch_size must be >= 1")
    cfg = sampling_from_args(a)
    items = None
    if a.data_file:   # model paths, then the data and the output path: all checked before the model is loaded
        for arg, kind in ((a.base_model, "model"), (a.lora_model, "adapter"), (a.tokenizer_path, "tokenizer")):
            if arg:
                resolve_model_path(arg, kind)
        items = read_instructions(a.data_file, a.input_field)
        check_predictions_file(a.predictions_file, a.data_file)
        if a.constrain == "abc":  # an impossible request is refused before the model loads
            try:
                request_fields(a, items)
            except ConstraintError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    loaded = load_model(a.base_model, a.lora_model, a.tokenizer_path, device=a.device, dtype=a.dtype,
                        trust_remote_code=a.trust_remote_code)
    if getattr(loaded.tokenizer, "init_kwargs", {}).get("tunesmith_audio"):
        raise ModelPathError(f"model {a.base_model}: an audio (codec-token) model; chat and --data_file generate "
                             "text. Fix: add --audio (e.g. python inference/predict.py --audio --model "
                             f"{a.base_model} --prompt 'a jig in D major' --out x.wav)")
    print(f"loaded {a.base_model}{' + ' + a.lora_model if a.lora_model else ''} on {loaded.device} "
          f"({str(loaded.dtype).replace('torch.', '')})", file=sys.stderr)
    if a.data_file:
        try:
            run_batch(a, loaded, cfg, items)
        except ConstraintError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if a.interactive:
        run_interactive(a, loaded, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
