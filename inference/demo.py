"""A local web page to chat with a tunesmith model, read each reply's sheet music and hear it.

    python inference/demo.py --model runs/x/merged                    # http://127.0.0.1:7860/
    python inference/demo.py --model runs/x/base_model --lora_model runs/x/final --port 0   # any free port

One page, a small JSON API, Python's standard library HTTP server (no gradio, no public share link):
- chat with history (kept in the page; /api/chat gets the whole conversation), tokens streamed as they are
  generated, sampling sliders (temperature, top_k, top_p, repetition_penalty, max_new_tokens, seed);
- every ABC tune in a reply is rendered by inference.render: sheet music engraved by ``abcm2ps`` straight
  from the ABC, a WAV player (abc2midi + fluidsynth), MIDI/ABC downloads, tool errors shown;
- a "Render ABC" box renders any ABC you paste (the same pipeline, no model involved);
- a "constrain to ABC" checkbox (JSON ``"constrain": "abc"``; default from ``--constrain``): the reply is an
  ABC tune with the header fields the message asks for and bars that keep time (inference/abc_constraint.py);
  the ``done`` event then carries a ``constraint`` record (fields asked, satisfied, stop reason).

Ctrl-C or SIGTERM (``kill PID``) stops it cleanly: the temporary render dir (named in the start line) is
removed and the exit status is 0.

Security: binds 127.0.0.1 unless ``--host`` says otherwise (with a warning: there is no authentication).
Model output is untrusted: reply text is shown as text, never as HTML; sheet music is shown through
``<img>`` (abcm2ps passes ``%%beginsvg`` blocks from the ABC through verbatim, and scripts in an SVG do not
run inside ``<img>``) and served with a restrictive Content-Security-Policy; only files this server
rendered can be downloaded.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
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

from inference.cli_config import parse_with_config
from inference.generation import SamplingConfig, build_prompt, generate, trim_history
from inference.predict import (
    add_constrain_arg,
    add_model_args,
    add_sampling_args,
    sampling_from_args,
)
from inference.render import render_text
from training.hf_io import exit_on_model_path_error

MAX_BODY = 1 << 20          # bytes of a request body
MAX_NEW_TOKENS = 8192       # server-side cap on the slider
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_TYPES = {".svg": "image/svg+xml", ".wav": "audio/wav", ".mid": "audio/midi", ".abc": "text/plain; charset=utf-8",
          ".json": "application/json"}


class DemoApp:
    """The model, the render directory and the two operations the page needs."""

    def __init__(self, loaded, defaults: SamplingConfig, render_dir: Path, model_name: str, wav: bool = True,
                 constrain: str = "none"):
        self.loaded, self.defaults, self.render_dir, self.model_name, self.wav = loaded, defaults, render_dir, model_name, wav
        self.constrain = constrain  # the page's checkbox starts from this
        self.lock = threading.Lock()  # one generation at a time on the one model
        max_pos = getattr(loaded.model.config, "max_position_embeddings", 4096)
        self.max_pos = int(max_pos)

    def sampling(self, d: dict | None) -> SamplingConfig:
        merged = {**self.defaults.to_dict(), **{k: v for k, v in (d or {}).items() if v not in (None, "")}}
        try:
            cfg = SamplingConfig(temperature=float(merged["temperature"]), top_k=int(merged["top_k"]),
                                 top_p=float(merged["top_p"]), repetition_penalty=float(merged["repetition_penalty"]),
                                 max_new_tokens=min(int(merged["max_new_tokens"]), MAX_NEW_TOKENS),
                                 seed=None if merged.get("seed") is None else int(merged["seed"]),
                                 cache=self.defaults.cache)  # a server setting (--cache), not a page slider
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
                return f"/files/{rid}/{Path(path).name}" if path else None
            tunes.append({"abc": Path(t["abc"]).read_text(encoding="utf-8") if t["abc"] else "",
                          "svg_url": url(t["svg"]), "wav_url": url(t["wav"]), "midi_url": url(t["midi"]),
                          "abc_url": url(t["abc"]), "wav_seconds": t["wav_seconds"], "ok": t["ok"],
                          "errors": t["errors"], "warnings": t["warnings"]})
        return {"tunes": tunes, "note": res["note"]}

    def chat(self, messages: list[dict], sampling: SamplingConfig, on_text, constrain: str = "none") -> dict:
        tok = self.loaded.tokenizer
        msgs = trim_history(tok, messages, max(16, self.max_pos - sampling.max_new_tokens))
        prompt = build_prompt(tok, msgs)
        fields = None
        if constrain == "abc":
            from inference.abc_constraint import extract_fields

            fields = extract_fields(msgs[-1]["content"])  # the user's own words, not the template's
        t0 = time.time()
        with self.lock:
            r = generate(self.loaded.model, tok, prompt, sampling, on_text=on_text, device=self.loaded.device,
                         constrain=constrain, fields=fields)
        dt = time.time() - t0
        res = {"reply": r["output"], "prompt_tokens": r["prompt_tokens"], "new_tokens": r["new_tokens"],
               "stopped_at_eos": r["stopped_at_eos"], "seconds": round(dt, 3),
               "tokens_per_s": round(r["new_tokens"] / max(dt, 1e-9), 2),
               "dropped_messages": len(messages) - len(msgs)}
        if "constraint" in r:
            res["constraint"] = r["constraint"]
        return res


def _check_constrain(body: dict, default: str) -> str:
    """The request's ``constrain``: "abc"/"none" or a boolean (the page's checkbox); absent = the server's."""
    v = body.get("constrain", default)
    if v is True or v == "abc":
        return "abc"
    if v in (False, None, "none", ""):
        return "none"
    raise ValueError("'constrain' must be \"abc\", \"none\" or a boolean")


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

        def _body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                raise ValueError(f"request body too large ({n} bytes > {MAX_BODY})")
            try:
                data = json.loads(self.rfile.read(n) or b"{}")
            except json.JSONDecodeError as e:
                raise ValueError(f"request body is not JSON: {e.msg}") from None
            if not isinstance(data, dict):
                raise TypeError("request body must be a JSON object")
            return data

        # -- routes ------------------------------------------------------------------------------
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8",
                           {"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                            "style-src 'unsafe-inline'; img-src 'self'; media-src 'self'"})
            elif path == "/api/config":
                self._json({"model": app.model_name, "sampling": app.defaults.to_dict(), "max_new_tokens_cap": MAX_NEW_TOKENS,
                            "constrain": app.constrain})
            elif path.startswith("/files/"):
                self._file(path)
            else:
                self._json({"error": f"not found: {path}"}, 404)

        def _file(self, path: str):
            parts = path.split("/")
            if len(parts) != 4 or not all(_NAME.match(p) for p in parts[2:]) or ".." in parts:
                return self._json({"error": "not found"}, 404)
            f = app.render_dir / parts[2] / parts[3]
            if not f.is_file() or f.suffix not in _TYPES:
                return self._json({"error": "not found"}, 404)
            self._send(200, f.read_bytes(), _TYPES[f.suffix],
                       {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})

        def do_POST(self):
            path = self.path.split("?", 1)[0]
            try:
                body = self._body()
                if path == "/api/render":
                    abc = body.get("abc")
                    if not isinstance(abc, str) or not abc.strip():
                        raise ValueError("'abc' must be a non-empty string")
                    return self._json(app.render(abc))
                if path == "/api/chat":
                    msgs, constrain = _check_messages(body), _check_constrain(body, app.constrain)
                    if constrain == "abc":  # an impossible request is a 400 naming the field, before streaming
                        from inference.abc_constraint import (
                            extract_fields,
                            validate_fields,
                        )

                        validate_fields(extract_fields(msgs[-1]["content"]))
                    return self._chat(msgs, app.sampling(body.get("sampling")), constrain)
                return self._json({"error": f"not found: {path}"}, 404)
            except (ValueError, TypeError) as e:
                return self._json({"error": str(e)}, 400)

        def _chat(self, messages: list[dict], sampling: SamplingConfig, constrain: str = "none"):
            """Streams NDJSON: {"type": "token", "text"} per piece, then {"type": "done", reply, tunes, ...}."""
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes

            def emit(obj):
                self.wfile.write((json.dumps(obj) + "\n").encode())
                self.wfile.flush()

            try:
                res = app.chat(messages, sampling, on_text=lambda s: emit({"type": "token", "text": s}),
                               constrain=constrain)
                emit({"type": "done", **res, **app.render(res["reply"]), "sampling": sampling.to_dict()})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the page went away: generation stops here
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
    ap.add_argument("--render_dir", default=None, help="where rendered files go (default: a temp dir, removed on exit)")
    ap.add_argument("--no_wav", action="store_true", help="skip audio synthesis (sheet music only)")
    add_constrain_arg(ap)
    add_sampling_args(ap)
    return ap


def serve(app: DemoApp, host: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(app))
    server.daemon_threads = True
    return server


@exit_on_model_path_error
def main(argv=None) -> int:
    a = parse_with_config(build_parser(), argv)
    defaults = sampling_from_args(a)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: binding {a.host}: anyone who can reach this machine can use the model (no authentication)",
              file=sys.stderr)
    from inference.loading import load_model

    loaded = load_model(a.base_model, a.lora_model, a.tokenizer_path, device=a.device, dtype=a.dtype,
                        trust_remote_code=a.trust_remote_code)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops the demo the way Ctrl-C does
    tmp = server = None
    try:
        if a.render_dir:
            render_dir = Path(a.render_dir)
            render_dir.mkdir(parents=True, exist_ok=True)
        else:
            render_dir = tmp = Path(tempfile.mkdtemp(prefix="tunesmith_demo_"))
        name = a.base_model + (f" + {a.lora_model}" if a.lora_model else "")
        server = serve(DemoApp(loaded, defaults, render_dir, name, wav=not a.no_wav, constrain=a.constrain),
                       a.host, a.port)
        host, port = server.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"tunesmith demo: http://{shown}:{port}/  (model {name} on {loaded.device}; renders in {render_dir}"
              f"{' (removed on exit)' if tmp else ''}; Ctrl-C or kill PID to stop)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.server_close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM: the same clean exit as Ctrl-C (temp render dir removed, status 0)


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tunesmith demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:0;background:#f6f5f2;color:#222}
 header{background:#2d3e50;color:#fff;padding:.6em 1em}
 header small{opacity:.7;margin-left:1em}
 main{display:grid;grid-template-columns:minmax(0,1fr) 290px;gap:1em;padding:1em}
 #chat{display:flex;flex-direction:column;gap:.7em}
 .msg{background:#fff;border-radius:8px;padding:.6em .8em;box-shadow:0 1px 2px #0002}
 .msg.user{background:#e3edf7;align-self:flex-end;max-width:80%}
 .msg .who{font-size:.75em;color:#666;margin-bottom:.2em}
 .msg pre{white-space:pre-wrap;margin:0;font-family:ui-monospace,monospace;font-size:.9em}
 .tune{border-top:1px solid #ddd;margin-top:.6em;padding-top:.6em}
 .tune img.sheet{max-width:100%;background:#fff;display:block}
 .tune audio{width:100%;margin-top:.3em}
 .errors{color:#a22;font-size:.8em;white-space:pre-wrap}
 .note,.stats{color:#777;font-size:.8em}
 aside{background:#fff;border-radius:8px;padding:.8em;box-shadow:0 1px 2px #0002;align-self:start}
 aside label{display:block;font-size:.85em;margin-top:.5em}
 aside input[type=range]{width:100%}
 textarea{width:100%;box-sizing:border-box;font-family:ui-monospace,monospace}
 #composer{display:flex;gap:.5em;margin-top:.8em}
 #composer textarea{flex:1}
 button{padding:.4em .9em;border-radius:6px;border:1px solid #2d3e50;background:#2d3e50;color:#fff;cursor:pointer}
 button.secondary{background:#fff;color:#2d3e50}
 button:disabled{opacity:.5}
</style></head>
<body>
<header><b>tunesmith</b><small id="model"></small></header>
<main>
 <section>
  <div id="chat"></div>
  <div id="composer">
   <textarea id="prompt" rows="3" placeholder="Ask for a tune, e.g. Compose a jig in D major (Enter sends, Shift+Enter = new line)"></textarea>
   <div style="display:flex;flex-direction:column;gap:.4em">
    <button id="send">Send</button><button id="reset" class="secondary">Reset</button>
   </div>
  </div>
 </section>
 <aside>
  <b>Sampling</b>
  <label>temperature <span id="v-temperature"></span><input type="range" id="temperature" min="0" max="2" step="0.05"></label>
  <label>top_k <span id="v-top_k"></span><input type="range" id="top_k" min="0" max="200" step="1"></label>
  <label>top_p <span id="v-top_p"></span><input type="range" id="top_p" min="0.05" max="1" step="0.05"></label>
  <label>repetition_penalty <span id="v-repetition_penalty"></span><input type="range" id="repetition_penalty" min="1" max="2" step="0.05"></label>
  <label>max_new_tokens <span id="v-max_new_tokens"></span><input type="range" id="max_new_tokens" min="16" max="4096" step="16"></label>
  <label>seed (empty = random) <input type="number" id="seed" style="width:100%"></label>
  <label><input type="checkbox" id="constrain"> constrain to ABC (asked key/meter/title, bars keep time)</label>
  <hr>
  <b>Render ABC</b>
  <textarea id="abc-input" rows="8" placeholder="Paste an ABC tune (X:, T:, M:, L:, K: then notes)"></textarea>
  <button id="render-btn" style="margin-top:.4em">Render</button>
 </aside>
</main>
<script>
"use strict";
const SLIDERS = ["temperature","top_k","top_p","repetition_penalty","max_new_tokens"];
let history = [];
const $ = id => document.getElementById(id);

function el(tag, cls, text){ const e = document.createElement(tag); if(cls) e.className = cls;
  if(text !== undefined) e.textContent = text; return e; }

function addMsg(role, text){
  const m = el("div", "msg " + role); m.appendChild(el("div", "who", role === "user" ? "You" : role === "assistant" ? "Model" : "Rendered ABC"));
  const pre = el("pre", "text", text); m.appendChild(pre); $("chat").appendChild(m);
  m.scrollIntoView({block: "end"}); return m;
}

function showTunes(box, d){
  if(d.note){ box.appendChild(el("div", "note", d.note)); }
  for(const t of d.tunes || []){
    const w = el("div", "tune");
    if(t.svg_url){ const img = el("img", "sheet"); img.alt = "sheet music"; img.src = t.svg_url; w.appendChild(img); }
    if(t.wav_url){ const a = el("audio"); a.controls = true; a.preload = "auto"; a.src = t.wav_url; w.appendChild(a); }
    const links = el("div", "note");
    for(const [k, label] of [["midi_url","MIDI"],["abc_url","ABC"],["wav_url","WAV"]]){
      if(t[k]){ const l = el("a", "", label); l.href = t[k]; l.download = ""; links.appendChild(l); links.appendChild(document.createTextNode(" ")); } }
    if(t.wav_seconds) links.appendChild(document.createTextNode(t.wav_seconds.toFixed(1) + " s"));
    w.appendChild(links);
    if(t.errors && t.errors.length) w.appendChild(el("div", "errors", t.errors.join("\n")));
    box.appendChild(w);
  }
}

function sampling(){
  const s = {}; for(const k of SLIDERS) s[k] = Number($(k).value);
  s.seed = $("seed").value === "" ? null : Number($("seed").value); return s;
}

async function send(){
  const text = $("prompt").value.trim(); if(!text) return;
  $("prompt").value = ""; $("send").disabled = true;
  history.push({role: "user", content: text}); addMsg("user", text);
  const box = addMsg("assistant", ""); const pre = box.querySelector("pre");
  try{
    const res = await fetch("/api/chat", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify({messages: history, sampling: sampling(),
                                                                constrain: $("constrain").checked ? "abc" : "none"})});
    if(!res.ok){ const e = await res.json(); throw new Error(e.error); }
    const reader = res.body.getReader(); const dec = new TextDecoder(); let buf = "";
    for(;;){
      const {value, done} = await reader.read(); if(done) break;
      buf += dec.decode(value, {stream: true}); let i;
      while((i = buf.indexOf("\n")) >= 0){
        const line = buf.slice(0, i); buf = buf.slice(i + 1); if(!line) continue;
        const ev = JSON.parse(line);
        if(ev.type === "token"){ pre.textContent += ev.text; }
        else if(ev.type === "done"){
          pre.textContent = ev.reply; history.push({role: "assistant", content: ev.reply});
          box.appendChild(el("div", "stats", `${ev.new_tokens} tokens, ${ev.tokens_per_s} tok/s` +
                                             (ev.stopped_at_eos ? "" : " (hit max_new_tokens)")));
          if(ev.constraint){ box.appendChild(el("div", "stats", "constraint " + JSON.stringify(ev.constraint.fields) +
                                             (ev.constraint.satisfied ? ": satisfied" : ": not satisfied (" + ev.constraint.stop + ")"))); }
          showTunes(box, ev); box.dataset.done = "1";
        } else if(ev.type === "error"){ throw new Error(ev.error); }
      }
    }
  } catch(err){
    box.appendChild(el("div", "errors", String(err.message || err))); history.pop(); box.dataset.done = "error";
  } finally { $("send").disabled = false; box.scrollIntoView({block: "end"}); }
}

async function renderAbc(){
  const abc = $("abc-input").value; if(!abc.trim()) return;
  const box = addMsg("render", abc);
  const res = await fetch("/api/render", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify({abc})});
  const d = await res.json();
  if(!res.ok){ box.appendChild(el("div", "errors", d.error)); box.dataset.done = "error"; return; }
  showTunes(box, d); box.dataset.done = "1"; box.scrollIntoView({block: "end"});
}

async function init(){
  const cfg = await (await fetch("/api/config")).json();
  $("model").textContent = cfg.model;
  for(const k of SLIDERS){
    $(k).value = cfg.sampling[k]; $("v-" + k).textContent = cfg.sampling[k];
    $(k).addEventListener("input", () => { $("v-" + k).textContent = $(k).value; });
  }
  if(cfg.sampling.seed !== null) $("seed").value = cfg.sampling.seed;
  $("constrain").checked = cfg.constrain === "abc";
  $("send").onclick = send; $("render-btn").onclick = renderAbc;
  $("reset").onclick = () => { history = []; $("chat").replaceChildren(); };
  $("prompt").addEventListener("keydown", e => { if(e.key === "Enter" && !e.shiftKey){ e.preventDefault(); send(); } });
  document.body.dataset.ready = "1";
}
init();
</script>
</body></html>
"""


if __name__ == "__main__":
    raise SystemExit(main())
