"""Issue 18, demo side, through real HTTP on 127.0.0.1: requests from other sites (Host / Origin), files
it did not render (symlinks, strays), malformed or oversized requests, prompts longer than the model's
context, too many connections, a client that goes away mid-generation, SIGTERM mid-generation.

The model is the tiny random LLaMA of conftest (2,048 positions): it never stops on its own, so a long
generation is easy to start."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import time

import pytest
from test_demo import SCALE, _start_demo


@pytest.fixture(scope="module")
def demo(tiny_model_dir, tmp_path_factory):
    render_dir = tmp_path_factory.mktemp("renders")
    proc, url, _ = _start_demo(tiny_model_dir, "--render_dir", str(render_dir), "--allow_host", "tunes.lan")
    port = int(re.search(r":(\d+)/", url).group(1))
    try:
        yield port, render_dir, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _req(port, method, path, body=None, headers=None, raw: bytes | None = None) -> tuple[int, dict | bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    h = {"Content-Type": "application/json", **(headers or {})}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    c.putrequest(method, path, skip_host="Host" in h, skip_accept_encoding=True)
    for k, v in h.items():
        c.putheader(k, v)
    if data is not None and "Content-Length" not in h:
        c.putheader("Content-Length", str(len(data)))
    c.endheaders(data)
    r = c.getresponse()
    out = r.read()
    c.close()
    try:
        return r.status, json.loads(out)
    except ValueError:
        return r.status, out


def _chat(port, content="hi", sampling=None, **kw):
    return _req(port, "POST", "/api/chat", {"messages": [{"role": "user", "content": content}],
                                           "sampling": sampling or {}}, **kw)


def test_other_sites_and_rebound_names_are_refused(demo):
    port = demo[0]
    evil = {"Host": "evil.example", "Origin": "http://evil.example", "Content-Type": "text/plain"}
    code, err = _req(port, "POST", "/api/render", {"abc": SCALE}, headers=evil)
    assert code == 403 and "evil.example" in err["error"]
    for h in ({"Host": "evil.example"}, {"Host": f"127.0.0.1:{port + 1}"},
              {"Host": f"127.0.0.1:{port}", "Origin": "http://evil.example"},
              {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port + 1}"},
              {"Host": f"localhost:{port}", "Origin": "null"}):
        assert _req(port, "GET", "/api/config", headers=h)[0] == 403, h
        assert _req(port, "POST", "/api/render", {"abc": SCALE}, headers=h)[0] == 403, h
    for h in ({"Host": f"localhost:{port}"}, {"Host": f"[::1]:{port}", "Origin": f"http://[::1]:{port}"},
              {"Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port}"}, {"Host": f"tunes.lan:{port}"}):
        assert _req(port, "GET", "/api/config", headers=h)[0] == 200, h
    # a cross-site "simple" request (text/plain needs no preflight) is refused even with a good Host
    code, err = _req(port, "POST", "/api/render", raw=json.dumps({"abc": SCALE}).encode(),
                     headers={"Content-Type": "text/plain"})
    assert code == 415


def test_only_files_it_rendered_are_served_and_no_symlink(demo):
    port, render_dir, _ = demo
    code, res = _req(port, "POST", "/api/render", {"abc": SCALE})
    assert code == 200
    svg_url = res["tunes"][0]["svg_url"]
    code, svg = _req(port, "GET", svg_url)
    rid, name = svg_url.split("/")[2:]
    assert code == 200 and svg == (render_dir / rid / name).read_bytes()
    # planted next to real renders: a symlink to a system file, a stray file, a rendered file replaced by a link
    (render_dir / rid / "passwd.abc").symlink_to("/etc/passwd")
    (render_dir / rid / "stray.svg").write_text("<svg/>")
    (render_dir / "x1").mkdir()
    (render_dir / "x1" / "tune.svg").write_text("<svg/>")
    for path in (f"/files/{rid}/passwd.abc", f"/files/{rid}/stray.svg", "/files/x1/tune.svg",
                 "/files/../../etc/passwd", f"/files/{rid}/../x1/tune.svg"):
        assert _req(port, "GET", path)[0] == 404, path
    target = render_dir / rid / name
    target.unlink()
    target.symlink_to("/etc/passwd")
    code, body = _req(port, "GET", svg_url)
    assert code == 404 and b"root:" not in json.dumps(body).encode()


def test_malformed_and_oversized_requests_get_one_clear_error(demo):
    port = demo[0]
    assert _req(port, "POST", "/api/render", raw=b"", headers={"Content-Length": "-1"})[0] == 400
    assert _req(port, "POST", "/api/render", raw=b"", headers={"Content-Length": "abc"})[0] == 400
    assert _req(port, "POST", "/api/render", raw=b"", headers={"Content-Length": str(10**9)})[0] == 413
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)    # no Content-Length at all
    c.putrequest("POST", "/api/render")
    c.putheader("Content-Type", "application/json")
    c.endheaders()
    assert c.getresponse().status == 411
    c.close()
    bad = {"sampling": [1, 2]} , {"sampling": {"max_new_tokens": -5}}, {"sampling": {"max_new_tokens": 10**9}}, \
        {"sampling": {"top_k": "40"}}, {"sampling": {"temperature": True}}, {"sampling": {"nope": 1}}, \
        {"sampling": {"top_k": 1.5}}
    for b in bad:
        code, err = _req(port, "POST", "/api/chat", {"messages": [{"role": "user", "content": "hi"}], **b})
        assert code == 400 and "sampling" in err["error"], (b, err)
    for raw in (b'{"messages": [{"role": "user", "content": "hi"}], "sampling": {"max_new_tokens": 1e400}}',
                b'{"messages": [{"role": "user", "content": "hi"}], "sampling": {"temperature": NaN}}',
                b'{"messages": [{"role": "user", "content": "hi"}], "sampling": {"temperature": -Infinity}}',
                b"[" * 200_000, b'{"a": ' + b"9" * 5000 + b"}", b"\xff\xfe{}"):
        code, err = _req(port, "POST", "/api/chat", raw=raw)
        assert code == 400 and isinstance(err, dict) and err["error"], raw[:40]
    code, err = _req(port, "POST", "/api/chat", {"messages": [{"role": "user", "content": "x" * 900_000}]})
    assert code == 400 and "messages[0]" in err["error"]


def test_history_is_cut_to_the_context_and_said_so(demo):
    port = demo[0]
    turns = []
    for i in range(40):
        turns += [{"role": "user", "content": f"question {i} " + "abc " * 60},
                  {"role": "assistant", "content": "X:1\nK:C\n" + "CDEF " * 40}]
    turns.append({"role": "user", "content": "last question"})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", "/api/chat", json.dumps({"messages": turns, "sampling": {"max_new_tokens": 4}}),
              {"Content-Type": "application/json"})
    lines = [json.loads(ln) for ln in c.getresponse().read().decode().splitlines() if ln]
    done = lines[-1]
    assert done["type"] == "done", lines[-1]
    assert done["dropped_messages"] > 0 and done["prompt_tokens"] <= 2048 - 4
    assert any("oldest message(s) were left out" in n for n in done["notes"])


def test_connections_are_bounded_and_idle_ones_do_not_block(demo):
    port = demo[0]
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(24)]
    time.sleep(0.5)
    busy = 0
    for s in socks:                      # the ones past the bound were answered 503 and closed
        s.settimeout(0.05)
        try:
            busy += s.recv(100).startswith(b"HTTP/1.0 503")
        except TimeoutError:
            pass
    assert busy == 24 - 16
    for s in socks:
        s.close()
    time.sleep(0.3)
    assert _req(port, "GET", "/api/config")[0] == 200


def _start_chat(port, body: dict) -> socket.socket:
    """Sends a chat request on a raw socket and returns once the first token has streamed back."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = json.dumps(body).encode()
    s.sendall(b"POST /api/chat HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    got = b""
    while b'"token"' not in got:
        piece = s.recv(4096)
        assert piece, got
        got += piece
    return s


LONG_CHAT = {"messages": [{"role": "user", "content": "go on forever"}],
             "sampling": {"max_new_tokens": 2000, "temperature": 0}}


def test_generation_stops_when_the_client_goes_away(demo):
    port = demo[0]
    code, full = _chat(port, LONG_CHAT["messages"][0]["content"], LONG_CHAT["sampling"])   # the whole run, timed
    done = [json.loads(ln) for ln in full.decode().splitlines()][-1]
    assert code == 200 and done["new_tokens"] >= 1000, done     # greedy on the random model: no EOS
    s = _start_chat(port, LONG_CHAT)
    s.close()                                   # the page went away
    t1 = time.time()
    assert _chat(port, "next", {"max_new_tokens": 2})[0] == 200   # waits for the model lock
    assert time.time() - t1 < 0.3 * done["seconds"], (time.time() - t1, done["seconds"])


def test_sigterm_mid_generation_exits_0(demo):
    """Last test of the module: it stops the shared demo."""
    port, _, proc = demo
    s = _start_chat(port, LONG_CHAT)
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    finally:
        s.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    err = proc.stderr.read()
    assert rc == 0 and "terminate called" not in err and "Traceback" not in err, err[-2000:]


EVIL_PAGE = """<!doctype html><html><body><script>
const demo = "http://127.0.0.1:PORT", abc = ABC;
async function attempt(name, run) {
  try { return [name, await run()]; } catch (e) { return [name, "blocked: " + e.name]; }
}
(async () => {
  const out = Object.fromEntries(await Promise.all([
    // a "simple" cross-site request: no preflight, the browser sends it and hides the answer
    attempt("simple_post", async () => (await fetch(demo + "/api/render", {method: "POST", mode: "no-cors",
      headers: {"Content-Type": "text/plain"}, body: JSON.stringify({abc})})).type),
    // JSON needs a preflight the demo never grants
    attempt("json_post", async () => (await fetch(demo + "/api/render", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({abc})})).status),
    attempt("read_config", async () => await (await fetch(demo + "/api/config")).text()),
  ]));
  document.body.dataset.result = JSON.stringify(out);
})();
</script></body></html>"""


def test_in_a_real_browser_other_sites_and_rebinding_get_nothing(tiny_model_dir, tmp_path):
    """Chromium, as a user's browser: a page of another origin (another port of 127.0.0.1, so the browser's
    own private-network rules do not step in) tries to make the demo render and to read it; and a rebound
    name (``--host-resolver-rules`` maps rebind.example to 127.0.0.1, what DNS rebinding achieves) loads
    the demo's page. Neither gets a render, a byte of the demo's data or its page."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from playwright.sync_api import sync_playwright
    from test_demo import CHROMIUM_ARGS

    render_dir = tmp_path / "renders"  # its own demo: the module's fixture is SIGTERMed by the test above
    proc, url, _ = _start_demo(tiny_model_dir, "--render_dir", str(render_dir))
    port = int(re.search(r":(\d+)/", url).group(1))
    before = sorted(p.name for p in render_dir.rglob("*"))
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(EVIL_PAGE.replace("PORT", str(port)).replace("ABC", json.dumps(SCALE)))
    quiet = type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    evil = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(site)))
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=CHROMIUM_ARGS + ["--host-resolver-rules=MAP rebind.example 127.0.0.1"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{evil.server_address[1]}/index.html")
                page.wait_for_selector("body[data-result]", state="attached", timeout=30_000)
                got = json.loads(page.get_attribute("body", "data-result"))
                assert got["simple_post"] == "opaque"                   # sent, answer hidden: refused (403) below
                assert got["json_post"].startswith("blocked") and got["read_config"].startswith("blocked"), got
                # DNS rebinding: the demo's own URL under another name
                resp = page.goto(f"http://rebind.example:{port}/")
                assert resp.status == 403 and "rebind.example" in page.content()
                assert "tunesmith" not in page.title().lower()
                # control: the same browser does reach the demo under its own name
                assert page.goto(f"http://127.0.0.1:{port}/").status == 200
            finally:
                browser.close()
    finally:
        evil.shutdown()
        proc.terminate()
        proc.wait(timeout=30)
    assert sorted(p.name for p in render_dir.rglob("*")) == before  # nothing was rendered for the other site
