"""A local web page to chat with a tunesmith model, read each reply's sheet music and hear it.

    python inference/demo.py --model runs/x/merged                    # http://127.0.0.1:7860/
    python inference/demo.py --model runs/x/base_model --lora_model runs/x/final --port 0   # any free port

One page (``inference/static/``: demo.html, demo.css, demo.js), a small JSON API, Python's standard library
HTTP server (no gradio, no public share link):
- chat with history (kept in the page; /api/chat gets the whole conversation), tokens streamed as they are
  generated, sampling sliders (temperature, top_k, top_p, repetition_penalty, max_new_tokens, seed);
- every ABC tune in a reply is rendered by inference.render: sheet music engraved by ``abcm2ps`` straight
  from the ABC, a WAV player (abc2midi + fluidsynth), MIDI/ABC downloads, tool errors shown;
- a "Render ABC" box renders any ABC you paste (the same pipeline, no model involved);
- a "constrain to ABC" checkbox (JSON ``"constrain": "abc"``; default from ``--constrain``): the reply is an
  ABC tune with the header fields the message asks for and bars that keep time (inference/abc_constraint.py);
  the ``done`` event then carries a ``constraint`` record (fields asked, satisfied, stop reason).

Ctrl-C or SIGTERM (``kill PID``) stops it cleanly whatever it is doing (generation is told to stop,
running render tools are killed): the temporary render dir (named in the start line) is removed and the exit
status is 0.

Security (the page is reachable by every web page the user visits, through the browser):
- binds 127.0.0.1 unless ``--host`` says otherwise (with a warning: there is no authentication);
- every request's ``Host`` must be a localhost name (localhost, 127.0.0.1, [::1]) or the bound address, with
  this server's port (DNS rebinding), and an ``Origin``, when sent, must be one of those too (other sites'
  pages) -- else 403; ``--allow_host NAME`` adds a name. POSTs must be ``Content-Type: application/json``
  (a cross-site form or ``text/plain`` fetch cannot send that without a CORS preflight, which is refused);
- bounded work: request bodies (Content-Length required, at most MAX_BODY), every JSON field type- and
  range-checked (one 400 line), the chat history cut to the model's context (oldest turns first; the reply
  says so), MAX_HANDLERS concurrent connections (503 beyond), idle connections closed after IDLE_TIMEOUT s,
  generation stopped when the client goes away, files streamed in chunks, render tools capped
  (:mod:`data_preprocess.abctools`);
- the page runs no inline script or style: its Content-Security-Policy allows this server's own files only;
- model output is untrusted: reply text is shown as text, never as HTML; the ABC given to the tools is
  sanitised (no directive that reads a file, no PostScript/SVG pass-through); sheet music is shown through
  ``<img>`` and served with a restrictive Content-Security-Policy; only files this server rendered (an
  allowlist of the names it produced) can be downloaded, opened with O_NOFOLLOW and checked to lie inside
  the render dir (a symlink planted there is never followed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

if __package__ in (None, ""):  # `python inference/demo.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_preprocess import abctools
from data_preprocess.chat_format import ChatFormat
from data_preprocess.hub import exit_on_argument_error
from inference.abc_constraint import extract_fields, validate_fields
from inference.cli_config import parse_with_config
from inference.generation import SamplingConfig, generate, trim_history
from inference.loading import load_model
from inference.predict import (
    add_constrain_arg,
    add_model_args,
    add_sampling_args,
    sampling_from_args,
)
from inference.render import render_text

MAX_BODY = 1 << 20          # bytes of a request body
MAX_NEW_TOKENS = 8192       # server-side cap on the slider
MAX_HANDLERS = 16           # concurrent connections; more get 503
IDLE_TIMEOUT = 20.0         # seconds a connection may sit without sending (socket timeout)
CHUNK = 1 << 16             # files are streamed in pieces of this size
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
STATIC_DIR = Path(__file__).resolve().parent / "static"   # the page: demo.html, demo.css, demo.js
_STATIC = {"/static/demo.css": ("demo.css", "text/css; charset=utf-8"),
           "/static/demo.js": ("demo.js", "text/javascript; charset=utf-8")}
_TYPES = {".svg": "image/svg+xml", ".wav": "audio/wav", ".mid": "audio/midi", ".abc": "text/plain; charset=utf-8",
          ".json": "application/json"}


class DemoApp:
    """The model, the render directory and the two operations the page needs."""

    def __init__(self, loaded, defaults: SamplingConfig, render_dir: Path, model_name: str, wav: bool = True,
                 constrain: str = "none"):
        self.loaded, self.defaults, self.render_dir, self.model_name, self.wav = loaded, defaults, render_dir, model_name, wav
        self.constrain = constrain  # the page's checkbox starts from this
        self.lock = threading.Lock()  # one generation at a time on the one model
        self.produced: set[str] = set()     # "rid/name" of every file this server rendered: all it will serve
        self.stopping = threading.Event()   # set on shutdown: generation stops at the next token
        self.allowed_hosts: set[str] = {"localhost", "127.0.0.1", "::1"}
        self.port = 0
        self.fmt = ChatFormat(loaded.tokenizer)  # the chat format the model was trained in
        max_pos = getattr(loaded.model.config, "max_position_embeddings", 4096)
        self.max_pos = int(max_pos)

    def sampling(self, d) -> SamplingConfig:
        """The request's ``sampling`` object over the server defaults; every field type- and range-checked
        (ValueError with one line naming the field)."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise TypeError(f"'sampling' must be an object of {{{', '.join(_SAMPLING)}}}, got {type(d).__name__}")
        merged = self.defaults.to_dict()
        for k, v in d.items():
            if k not in _SAMPLING:
                raise ValueError(f"sampling.{k}: unknown field (known: {', '.join(_SAMPLING)})")
            if v is None or v == "":
                continue
            kind, lo, hi = _SAMPLING[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"sampling.{k}: must be a finite number, got {json.dumps(v)[:40]}")
            if kind is int:
                if v != int(v):
                    raise ValueError(f"sampling.{k}: must be a whole number, got {v}")
                v = int(v)
            if not lo <= v <= hi:
                raise ValueError(f"sampling.{k}: {v} is out of range [{lo}, {hi}]")
            merged[k] = kind(v)
        try:
            cfg = SamplingConfig.from_dict(merged)
        except (TypeError, ValueError) as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith("bad sampling") else f"bad sampling settings: {msg}") from None
        return cfg

    def render(self, text: str) -> dict:
        """Renders every tune of ``text`` into a fresh subdir; returns records with URLs for the page."""
        rid = uuid.uuid4().hex[:12]
        out = self.render_dir / rid
        res = render_text(text, out, "tune", wav=self.wav)
        tunes = []
        for t in res["tunes"]:
            def url(path, rid=rid):
                if not path:
                    return None
                self.produced.add(f"{rid}/{Path(path).name}")
                return f"/files/{rid}/{Path(path).name}"
            tunes.append({"abc": Path(t["abc"]).read_text(encoding="utf-8") if t["abc"] else "",
                          "svg_url": url(t["svg"]), "wav_url": url(t["wav"]), "midi_url": url(t["midi"]),
                          "abc_url": url(t["abc"]), "wav_seconds": t["wav_seconds"], "ok": t["ok"],
                          "errors": t["errors"], "warnings": t["warnings"], "stripped": t["stripped"]})
        return {"tunes": tunes, "note": res["note"]}

    def prepare(self, messages: list[dict], sampling: SamplingConfig, constrain: str = "none") -> dict:
        """The prompt of a chat request: the history cut to the model's context (oldest turns first, said in
        ``notes``), max_new_tokens cut to the room left; a newest message that alone does not fit is a
        ValueError (400, before any streaming starts), and so is an impossible ``constrain="abc"`` request
        (ConstraintError naming the field). The constraint's header fields come from the user's own words
        (the newest message), not the chat template's."""
        notes = []
        fields = None
        if constrain == "abc":
            fields = extract_fields(messages[-1]["content"])
            validate_fields(fields)
        reserve = min(sampling.max_new_tokens, self.max_pos * 3 // 4)
        budget = self.max_pos - reserve
        kept = _cheap_cut(messages, budget * self.max_piece_chars)   # can never fit: not even tokenised
        if len(kept[-1]["content"]) > budget * self.max_piece_chars:
            raise ValueError(f"messages[{len(messages) - 1}]: {len(kept[-1]['content'])} characters, far more than "
                             f"the model's context ({self.max_pos} tokens) holds. Fix: send a shorter message")
        msgs = trim_history(self.fmt, kept, budget)
        prompt = self.fmt.prompt_ids(msgs)
        if len(prompt) > budget:
            raise ValueError(f"messages[{len(messages) - 1}]: the prompt is {len(prompt)} tokens, the model reads at "
                             f"most {budget} (context {self.max_pos} minus {reserve} for the reply). Fix: send a "
                             "shorter message or lower max_new_tokens")
        if len(msgs) < len(messages):
            notes.append(f"the {len(messages) - len(msgs)} oldest message(s) were left out: the conversation is longer "
                         f"than the model's context ({self.max_pos} tokens)")
        room = self.max_pos - len(prompt)
        if sampling.max_new_tokens > room:
            notes.append(f"max_new_tokens cut from {sampling.max_new_tokens} to {room} (the model's context is "
                         f"{self.max_pos} tokens)")
            sampling = SamplingConfig.from_dict({**sampling.to_dict(), "max_new_tokens": room})
        return {"messages": messages, "kept": msgs, "prompt": prompt, "sampling": sampling, "notes": notes,
                "constrain": constrain, "fields": fields}

    def chat(self, prep: dict, on_text, gone=lambda: False) -> dict:
        """One reply to a request made ready by :meth:`prepare`; ``gone()`` true (the client left) stops generation."""
        tok, prompt, sampling = self.loaded.tokenizer, prep["prompt"], prep["sampling"]
        messages, msgs, notes = prep["messages"], prep["kept"], prep["notes"]

        def stop() -> bool:
            return self.stopping.is_set() or gone()

        t0 = time.time()
        while not self.lock.acquire(timeout=0.25):   # one generation at a time; give up if the client leaves
            if stop():
                raise ConnectionAbortedError("client went away while waiting")
        try:
            r = generate(self.loaded.model, tok, prompt, sampling, on_text=on_text, device=self.loaded.device,
                         should_stop=stop, constrain=prep.get("constrain", "none"), fields=prep.get("fields"))
        finally:
            self.lock.release()
        dt = time.time() - t0
        res = {"reply": r["output"], "prompt_tokens": r["prompt_tokens"], "new_tokens": r["new_tokens"],
               "stopped_at_eos": r["stopped_at_eos"], "seconds": round(dt, 3),
               "tokens_per_s": round(r["new_tokens"] / max(dt, 1e-9), 2),
               "dropped_messages": len(messages) - len(msgs), "notes": notes}
        if "constraint" in r:
            res["constraint"] = r["constraint"]
        return res

    @property
    def max_piece_chars(self) -> int:
        """The most characters one token stands for (so a message of n chars is at least n / this tokens)."""
        if not hasattr(self, "_max_piece"):
            tok = self.loaded.tokenizer
            self._max_piece = max(4, max((len(tok.convert_tokens_to_string([t])) for t in tok.get_vocab()), default=4))
        return self._max_piece


# sampling fields a request may set: (type, min, max); ``cache`` is a server setting (--cache)
_SAMPLING = {"temperature": (float, 0.0, 100.0), "top_k": (int, 0, 1 << 20), "top_p": (float, 1e-9, 1.0),
             "repetition_penalty": (float, 1e-3, 100.0), "max_new_tokens": (int, 1, MAX_NEW_TOKENS),
             "seed": (int, 0, 2**32 - 1)}


def _check_constrain(body: dict, default: str) -> str:
    """The request's ``constrain``: "abc"/"none" or a boolean (the page's checkbox); absent = the server's."""
    v = body.get("constrain", default)
    if v is True or v == "abc":
        return "abc"
    if v is False or v is None or (isinstance(v, str) and v in ("none", "")):  # 0 is not a boolean
        return "none"
    raise ValueError("'constrain' must be \"abc\", \"none\" or a boolean")


def _cheap_cut(messages: list[dict], max_chars: int) -> list[dict]:
    """Drops the oldest turns that cannot fit whatever the tokenizer does (more characters than the context
    can hold at the longest token), before anything is tokenised; system message and newest turn kept."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    body, total, keep = messages[len(head):], sum(len(m["content"]) for m in head), []
    for m in reversed(body):
        total += len(m["content"])
        if keep and total > max_chars:
            break
        keep.append(m)
    keep.reverse()
    if keep and keep[0]["role"] == "assistant" and len(keep) > 1:
        keep = keep[1:]
    return head + keep


def _client_gone(sock) -> bool:
    """True when the peer closed its side (readable with nothing to read) or the socket is dead."""
    try:
        r, _, _ = select.select([sock], [], [], 0)
        return bool(r) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _split_host(host: str) -> tuple[str, str]:
    """``name:port`` / ``[v6]:port`` / ``name`` -> (name without brackets, port or "")."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, port
    return host, ""


def _finite_float(txt: str) -> float:
    v = float(txt)
    if not math.isfinite(v):
        raise ValueError(f"number {txt[:20]} is out of range")
    return v


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


class _Refused(Exception):
    def __init__(self, status: int, msg: str):
        super().__init__(msg)
        self.status = status


def _check_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list of {role, content}")
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}] must be {{role: user|assistant|system, content: str}}")
    if msgs[-1]["role"] != "user":
        raise ValueError("the last message must be the user's")
    return msgs


def make_handler(app: DemoApp):
    class Handler(BaseHTTPRequestHandler):
        server_version = "tunesmith-demo"
        timeout = IDLE_TIMEOUT   # socket timeout: an idle or stalled connection is dropped

        def log_message(self, fmt, *args):  # one short line per request on stderr
            sys.stderr.write(f"[demo] {self.address_string()} {fmt % args}\n")

        # -- helpers -----------------------------------------------------------------------------
        def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj, status: int = 200):
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _guard(self):
            """Host must name this server (localhost names, the bound address, --allow_host) with its port;
            an Origin, when present, too. Else _Refused(403)."""
            host = (self.headers.get("Host") or "").strip().lower()
            if not host:
                raise _Refused(403, "missing Host header")
            name, port = _split_host(host)
            if name not in app.allowed_hosts or (port and port != str(app.port)):
                raise _Refused(403, f"Host {host!r} is not this server (allowed: {', '.join(sorted(app.allowed_hosts))} "
                                    f"on port {app.port}; start the demo with --allow_host NAME to add one)")
            origin = self.headers.get("Origin")
            if origin is not None:
                from urllib.parse import urlsplit

                try:
                    u = urlsplit(origin.strip())
                    ok = (u.scheme == "http" and (u.hostname or "") in app.allowed_hosts
                          and (u.port or 80) == app.port)
                except ValueError:
                    ok = False
                if not ok:
                    raise _Refused(403, f"Origin {origin[:80]!r} is not this server: requests from other sites' pages "
                                        "are refused")

        def _body(self) -> dict:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise _Refused(415, "Content-Type must be application/json")
            raw = self.headers.get("Content-Length")
            if raw is None:
                raise _Refused(411, "Content-Length required")
            if not raw.strip().isdigit():
                raise _Refused(400, f"bad Content-Length {raw[:30]!r}: must be a whole number of bytes")
            n = int(raw)
            if n > MAX_BODY:
                raise _Refused(413, f"request body too large ({n} bytes > {MAX_BODY})")
            try:
                data = json.loads(self.rfile.read(n) or b"{}", parse_float=_finite_float, parse_constant=_no_constant)
            except RecursionError:
                raise ValueError("request body is nested too deeply") from None
            except ValueError as e:
                raise ValueError(f"request body is not valid JSON: {getattr(e, 'msg', e)}") from None
            if not isinstance(data, dict):
                raise TypeError("request body must be a JSON object")
            return data

        # -- routes ------------------------------------------------------------------------------
        def do_GET(self):
            try:
                self._guard()
            except _Refused as e:
                return self._json({"error": str(e)}, e.status)
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html") or path in _STATIC:
                name, ctype = _STATIC.get(path, ("demo.html", "text/html; charset=utf-8"))
                # the page, its style and its script are files of inference/static/ (no inline code, so the
                # policy allows scripts and styles from this server only)
                self._send(200, (STATIC_DIR / name).read_bytes(), ctype,
                           {"Content-Security-Policy": "default-src 'self'; img-src 'self'; media-src 'self'"})
            elif path == "/api/config":
                self._json({"model": app.model_name, "sampling": app.defaults.to_dict(), "max_new_tokens_cap": MAX_NEW_TOKENS,
                            "constrain": app.constrain})
            elif path.startswith("/files/"):
                self._file(path)
            else:
                self._json({"error": f"not found: {path}"}, 404)

        def _file(self, path: str):
            """Serves a file this server rendered (allowlist), never through a symlink, in chunks."""
            parts = path.split("/")
            if len(parts) != 4 or not all(_NAME.match(p) for p in parts[2:]) or ".." in parts:
                return self._json({"error": "not found"}, 404)
            key = f"{parts[2]}/{parts[3]}"
            suffix = Path(parts[3]).suffix
            if key not in app.produced or suffix not in _TYPES:
                return self._json({"error": "not found"}, 404)
            f = app.render_dir / parts[2] / parts[3]
            root = os.path.realpath(app.render_dir)
            try:
                if not os.path.realpath(f).startswith(root + os.sep):
                    raise OSError("outside the render dir")
                fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                return self._json({"error": "not found"}, 404)
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):     # a regular file only
                    return self._json({"error": "not found"}, 404)
                self.send_response(200)
                for k, v in (("Content-Type", _TYPES[suffix]), ("Content-Length", str(st.st_size)),
                             ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"),
                             ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")):
                    self.send_header(k, v)
                self.end_headers()
                left = st.st_size
                while left > 0:
                    piece = fh.read(min(CHUNK, left))
                    if not piece:
                        break
                    self.wfile.write(piece)
                    left -= len(piece)

        def do_POST(self):
            path = self.path.split("?", 1)[0]
            try:
                self._guard()
                body = self._body()
                if path == "/api/render":
                    abc = body.get("abc")
                    if not isinstance(abc, str) or not abc.strip():
                        raise ValueError("'abc' must be a non-empty string")
                    return self._json(app.render(abc))
                if path == "/api/chat":
                    msgs, constrain = _check_messages(body), _check_constrain(body, app.constrain)
                    return self._chat(msgs, app.sampling(body.get("sampling")), constrain)
                return self._json({"error": f"not found: {path}"}, 404)
            except _Refused as e:
                return self._json({"error": str(e)}, e.status)
            except (ValueError, TypeError) as e:
                return self._json({"error": str(e)}, 400)
            except OSError:
                return None   # the client went away or stalled past IDLE_TIMEOUT
            except Exception as e:  # noqa: BLE001 - one JSON line, never a dropped connection
                return self._json({"error": f"internal error: {type(e).__name__}: {e}"}, 500)

        def _chat(self, messages: list[dict], sampling: SamplingConfig, constrain: str = "none"):
            """Streams NDJSON: {"type": "token", "text"} per piece, then {"type": "done", reply, tunes, ...}."""
            # a prompt that can never fit, or an impossible constrain request, is a 400 before the stream starts
            prep = app.prepare(messages, sampling, constrain)
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes

            def emit(obj):
                self.wfile.write((json.dumps(obj) + "\n").encode())
                self.wfile.flush()

            try:
                res = app.chat(prep, on_text=lambda s: emit({"type": "token", "text": s}),
                               gone=lambda: _client_gone(self.connection))
                if app.stopping.is_set():
                    return
                emit({"type": "done", **res, **app.render(res["reply"]), "sampling": prep["sampling"].to_dict()})
            except (BrokenPipeError, ConnectionError, TimeoutError):
                pass  # the page went away: generation stopped
            except Exception as e:  # noqa: BLE001 - report any failure to the page instead of a dead stream
                try:
                    emit({"type": "error", "error": f"{type(e).__name__}: {e}"})
                except OSError:
                    pass

    return Handler


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Local web demo: chat, sheet music, audio.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", help="YAML/JSON file of these options (flags override it)")
    add_model_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind; anything but loopback exposes the "
                    "model to your network without authentication")
    ap.add_argument("--port", type=int, default=7860, help="0 = any free port (the URL is printed)")
    ap.add_argument("--allow_host", action="append", default=[], metavar="NAME",
                    help="also accept requests whose Host/Origin is NAME (e.g. the machine's LAN name with --host); "
                    "default: localhost names and the bound address only")
    ap.add_argument("--render_dir", default=None, help="where rendered files go (default: a temp dir, removed on exit)")
    ap.add_argument("--no_wav", action="store_true", help="skip audio synthesis (sheet music only)")
    add_constrain_arg(ap)
    add_sampling_args(ap)
    return ap


class BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most MAX_HANDLERS at once: the next one gets a 503 and is closed."""

    daemon_threads = True

    def __init__(self, *a, max_handlers: int = MAX_HANDLERS, **kw):
        self.slots = threading.BoundedSemaphore(max_handlers)
        super().__init__(*a, **kw)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                msg = b'{"error": "server busy: too many connections"}'
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(msg), msg))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve(app: DemoApp, host: str, port: int, allow_hosts=()) -> ThreadingHTTPServer:
    server = BoundedServer((host, port), make_handler(app))
    app.port = server.server_address[1]
    app.allowed_hosts |= {host.lower().strip("[]"), *(h.lower().strip("[]") for h in allow_hosts)}
    return server


@exit_on_argument_error
def main(argv=None) -> int:
    a = parse_with_config(build_parser(), argv)
    defaults = sampling_from_args(a)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: binding {a.host}: anyone who can reach this machine can use the model (no authentication)",
              file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops the demo the way Ctrl-C does, at any point
    tmp = server = app = None
    try:
        loaded = load_model(a.base_model, a.lora_model, a.tokenizer_path, device=a.device, dtype=a.dtype,
                            trust_remote_code=a.trust_remote_code)
        if a.render_dir:
            render_dir = Path(a.render_dir)
            render_dir.mkdir(parents=True, exist_ok=True)
        else:
            render_dir = tmp = Path(tempfile.mkdtemp(prefix="tunesmith_demo_"))
        name = a.base_model + (f" + {a.lora_model}" if a.lora_model else "")
        app = DemoApp(loaded, defaults, render_dir, name, wav=not a.no_wav, constrain=a.constrain)
        server = serve(app, a.host, a.port, a.allow_host)
        host, port = server.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"tunesmith demo: http://{shown}:{port}/  (model {name} on {loaded.device}; renders in {render_dir}"
              f"{' (removed on exit)' if tmp else ''}; Ctrl-C or kill PID to stop)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if app is not None:
            app.stopping.set()            # generation stops at its next token
        abctools.kill_running()
        if server is not None:
            server.server_close()
        busy = [t for t in threading.enumerate() if t is not threading.current_thread() and t.daemon]
        for t in busy:
            t.join(timeout=max(0.1, 3.0 / len(busy)))
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if any(t.is_alive() for t in busy):   # a handler still inside torch: exiting normally would abort (134)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM: the same clean exit as Ctrl-C (temp render dir removed, status 0)


if __name__ == "__main__":
    raise SystemExit(main())
