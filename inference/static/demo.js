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
          for(const n of (ev.notes || [])) box.appendChild(el("div", "note", n));
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
