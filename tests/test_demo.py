"""inference/demo.py in a real headless browser (Debian chromium driven by Playwright): type a prompt, get a
streamed reply, see the sheet music and the audio player; paste ABC into the render box; screenshot.

The model is the tiny LLaMA fine-tuned in tests/test_predict_fixtures.py to answer one prompt with one
tune (a random model never writes ABC): its reply is real model output, sampled with the page's default
sliders, and goes through the same extraction + abcm2ps/abc2midi/fluidsynth path as any reply."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_predict_fixtures import PROMPT, TUNE, memorised_model

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCALE = "X:1\nT:Pasted scale\nM:4/4\nL:1/4\nK:G\nG A B c|d e f g|]\n"


def _start_demo(model: Path, *extra: str) -> tuple[subprocess.Popen, str, str]:
    """Starts inference/demo.py on a free port (``extra``: more flags): (process, URL, the start line it printed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "inference" / "demo.py"), "--model", str(model), "--port", "0",
                             "--seed", "0", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"demo exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        m = re.search(r"(http://\S+/)", line)
        if m:
            return proc, m.group(1), line
    proc.terminate()
    raise AssertionError("demo printed no URL")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    memo = memorised_model(tiny_model_dir, tmp_path_factory.mktemp("demo_model"))
    proc, url, _ = _start_demo(memo)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_binds_loopback_and_rejects_bad_input(server):
    assert server.startswith("http://127.0.0.1:")
    code, err = _post(server + "api/chat", {"messages": [{"role": "user", "content": "hi"}], "sampling": {"top_p": 0}})
    assert code == 400 and "top_p" in err["error"]
    code, err = _post(server + "api/chat", {"messages": []})
    assert code == 400 and "messages" in err["error"]
    code, err = _post(server + "api/render", {"abc": "X:1\nK:C\nC(((D|]]]] &&&\n"})
    assert code == 200 and err["tunes"][0]["errors"]  # broken ABC: tool errors reported, not a crash
    # the page is static files (inference/static/) and its policy allows no inline script or style
    with urllib.request.urlopen(server, timeout=10) as r:
        page, csp = r.read().decode(), r.headers["Content-Security-Policy"]
    assert '<script src="/static/demo.js">' in page and "<script>" not in page and "style=" not in page
    assert "unsafe-inline" not in csp and "default-src 'self'" in csp
    for name, ctype in (("demo.js", "text/javascript"), ("demo.css", "text/css")):
        with urllib.request.urlopen(server + "static/" + name, timeout=10) as r:
            assert r.headers["Content-Type"].startswith(ctype) and r.read()
    for bad in ("files/../../etc/passwd", "files/x/..%2f..%2fetc%2fpasswd", "files/abc/nothing.svg",
                "static/../demo.py", "static/demo.html.bak"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server + bad, timeout=10)
        assert e.value.code == 404


def test_sigterm_removes_the_temp_render_dir(tiny_model_dir):
    """`kill PID` (what proc.terminate() sends) used to leave /tmp/tunesmith_demo_* behind; Ctrl-C did not."""
    proc, url, line = _start_demo(tiny_model_dir)
    try:
        render_dir = Path(re.search(r"renders in (\S+) \(removed on exit\)", line).group(1))
        code, res = _post(url + "api/render", {"abc": SCALE})
        assert code == 200 and res["tunes"][0]["svg_url"]
        assert render_dir.name.startswith("tunesmith_demo_") and any(render_dir.rglob("*.svg"))
    finally:
        proc.terminate()
        rc = proc.wait(timeout=30)
    assert rc == 0, proc.stderr.read()[-3000:]
    assert not render_dir.exists()
    assert "Traceback" not in proc.stderr.read()


def test_bad_model_path_is_one_line_exit_2(tmp_path):
    (tmp_path / "outputs").mkdir()
    p = subprocess.run([sys.executable, str(REPO / "inference" / "demo.py"), "--model", "outputs/nope"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2 and p.stderr == ("error: model outputs/nope: no such directory (and not a Hub id). Fix: "
                                              "pass the directory written by training/merge.py or train.py (…/final)\n")


def test_chat_in_browser_shows_sheet_music_and_audio(server, artifacts_dir):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(server)
            page.wait_for_selector("body[data-ready='1']")
            assert page.input_value("#temperature") == "0.2" and page.input_value("#top_k") == "40"
            page.fill("#prompt", PROMPT)
            page.click("#send")
            reply = page.wait_for_selector(".msg.assistant[data-done]", timeout=120_000)
            assert reply.get_attribute("data-done") == "1", reply.inner_text()
            text = reply.query_selector("pre").inner_text()
            assert TUNE.strip() in text
            # sheet music: the abcm2ps SVG, actually loaded and drawn by the browser
            img = reply.query_selector("img.sheet")
            page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=img)
            assert img.get_attribute("src").endswith(".svg")
            # audio: an <audio> element whose WAV the browser can load and knows the duration of
            audio = reply.query_selector("audio")
            page.wait_for_function("a => a.readyState >= 1 && a.duration > 1", arg=audio, timeout=30_000)
            assert audio.get_attribute("src").endswith(".wav")
            # the history is kept by the page: a second turn sends both messages
            page.fill("#prompt", "Another one?")
            with page.expect_request("**/api/chat") as req:
                page.click("#send")
            sent = json.loads(req.value.post_data)["messages"]
            assert [m["role"] for m in sent] == ["user", "assistant", "user"] and sent[1]["content"] == text
            page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-done]", timeout=120_000)

            # the render box: any pasted ABC
            page.fill("#abc-input", SCALE)
            page.click("#render-btn")
            rendered = page.wait_for_selector(".msg.render[data-done='1']", timeout=60_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 100",
                                   arg=rendered.query_selector("img.sheet"))
            assert rendered.query_selector("audio") is not None
            reply.scroll_into_view_if_needed()
            page.screenshot(path=str(artifacts_dir / "demo.png"), full_page=True)
        finally:
            browser.close()
    assert (artifacts_dir / "demo.png").stat().st_size > 10_000
