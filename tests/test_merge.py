"""training/merge.py: a LoRA adapter trained with added tokens + modules_to_save merges into a model whose
logits equal the adapter model's; a real ZeRO-3 DeepSpeed checkpoint becomes an HF dir that plain
transformers loads and that equals the engine's own (live-checked) HF export."""
from __future__ import annotations

import json

import pytest
import torch

from data_preprocess.hub import ArgumentError

ADDED = ["<bar>", "<beat>", "<tie>", "<triplet>"]
TEXT = "X:1\nT:Probe\nM:6/8\nL:1/8\nK:D\n<bar>dAF A2B<beat>c3 d2e<tie>|]"


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A real (tiny) LoRA fine-tune: tokenizer grows by 4 tokens, base resized as training does, PEFT
    LoRA on attention + MLP with embed_tokens/lm_head in modules_to_save, 6 AdamW steps."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.model import resize_embeddings

    out = tmp_path_factory.mktemp("lora_run")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(ADDED)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    resize_embeddings(base, len(tok))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"],
                                            modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tok([TEXT, TEXT[::-1]], return_tensors="pt", padding=True).input_ids
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it really trained
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().max() > 0 for p in lora_b)  # non-zero LoRA deltas (B starts at zero)
    model.save_pretrained(out / "adapter")
    tok.save_pretrained(out / "adapter")
    return {"base": tiny_model_dir, "adapter": out / "adapter", "tok_len": len(tok), "root": out}


def _logits(model, tok, text=TEXT):
    ids = tok(text, return_tensors="pt").input_ids
    assert (ids >= tok.convert_tokens_to_ids(ADDED[0])).any()  # the added tokens are in the probe
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merge_lora_with_added_tokens_equals_adapter_model(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from inference.loading import adapter_vocab_size, load_model
    from training.merge import main

    base_rows = AutoModelForCausalLM.from_pretrained(lora_run["base"]).get_input_embeddings().weight.shape[0]
    assert adapter_vocab_size(lora_run["adapter"]) == lora_run["tok_len"] > base_rows

    out = tmp_path / "merged"
    rc = main(["--base_model", str(lora_run["base"]), "--lora_model", str(lora_run["adapter"]),
               "--output_dir", str(out), "--max_shard_size", "300KB"])
    assert rc == 0
    info = json.loads((out / "merge_info.json").read_text())
    assert info["verified"] and info["vocab_rows"] == lora_run["tok_len"] and info["base_rows"] == base_rows
    assert info["checks"]["in_memory"]["max_abs_diff"] < 1e-4 and info["checks"]["reloaded"]["max_abs_diff"] < 1e-4
    # sharded safetensors + tokenizer + chat template + generation config
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert not list(out.glob("*.bin"))
    gen = GenerationConfig.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert (gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty) == (0.2, 40, 0.9, 1.1)
    assert tok.chat_template and len(tok) == lora_run["tok_len"]

    # independent check: plain transformers on the merged dir == inference.loading's base + adapter
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.vocab_size == lora_run["tok_len"]
    adapter = load_model(str(lora_run["base"]), str(lora_run["adapter"]), device="cpu", dtype="fp32")
    ref = _logits(adapter.model, adapter.tokenizer)
    got = _logits(merged, tok)
    assert (ref - got).abs().max().item() < 1e-4
    # and the comparison is sensitive: the base without the adapter gives clearly different logits
    plain = load_model(str(lora_run["base"]), None, tokenizer_path=str(lora_run["adapter"]), device="cpu", dtype="fp32")
    assert (ref - _logits(plain.model, plain.tokenizer)).abs().max().item() > 1e-2


def test_merge_refuses_non_empty_output_and_overwrites_on_request(lora_run, tmp_path):
    from training.merge import main

    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["--ori_model_dir", str(lora_run["base"]), "--model_dir", str(lora_run["adapter"]),  # ChatMusician flags
            "--output_dir", str(out), "--dtype", "bf16"]
    with pytest.raises(ArgumentError, match="not empty; pass --overwrite"):
        main.__wrapped__(args)
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(ArgumentError, match="overlaps the input"):
        main.__wrapped__(["--base_model", str(lora_run["base"]), "--lora_model", str(lora_run["adapter"]),
                          "--output_dir", str(lora_run["adapter"]), "--overwrite"])
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    info = json.loads((out / "merge_info.json").read_text())
    assert info["dtype"] == "bfloat16" and info["verified"]
    assert 0 < info["checks"]["reloaded"]["max_abs_diff"] <= info["checks"]["reloaded"]["tolerance"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_bad_model_paths_are_one_line_before_anything_is_written(lora_run, tmp_path, capsys, monkeypatch):
    """A missing base, a missing adapter, or a full model passed as the adapter: `error: ...` and exit 2
    (argparse's status), no traceback, and no output (or .partial) dir created."""
    from training.merge import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "default" / "sft").mkdir(parents=True)
    out = tmp_path / "outputs" / "merged"
    cases = {("outputs/default/sft/base_model", str(lora_run["adapter"])):
             "model outputs/default/sft/base_model: no such directory (and not a Hub id). Fix: pass the directory "
             "written by training/merge.py or train.py (…/final)",
             (str(lora_run["base"]), "outputs/default/sft/finall"):
             "adapter outputs/default/sft/finall: no such directory (and not a Hub id). Fix: ",
             (str(lora_run["base"]), str(lora_run["base"])):
             f"adapter {lora_run['base']}: a full model dir, not an adapter dir. Fix: "}
    for (base, lora), msg in cases.items():
        with pytest.raises(SystemExit) as e:
            main(["--base_model", base, "--lora_model", lora, "--output_dir", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {msg}") and err.count("\n") == 1, err
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["default"]


def test_compare_flags_a_real_difference():
    from training.merge import compare

    ref = [torch.randn(1, 5, 11)]
    assert compare(ref, [ref[0].clone()], torch.float32)["ok"]
    bad = ref[0].clone()
    bad[0, 2, 3] += 0.01
    res = compare(ref, [bad], torch.float32)
    assert not res["ok"] and res["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)


@pytest.fixture(scope="module")
def zero3_runs(tokenizer_dir, tmp_path_factory):
    """Two real training/train.py runs under DeepSpeed ZeRO-3 (llama-tiny, fp32, 2 steps): LoRA with
    embed_tokens/lm_head in modules_to_save, and full fine-tuning. Launched side by side (DeepSpeed start-up
    dominates on CPU)."""
    from concurrent.futures import ThreadPoolExecutor

    from test_train_fixtures import run_train, write_shards

    root = tmp_path_factory.mktemp("zero3_runs")
    data = write_shards(tokenizer_dir, root / "pt", "pt", n_tunes=30, n_val=4)
    common = [f"data_dir={data}", "model=llama-tiny", "max_steps=2", "global_batch_size=2", "micro_batch_size=2",
              "lr=3e-3", "save_every=2", "eval_every=0", "report_to=none", "ds_config=ds_configs/zero3.json"]
    jobs = {"lora": ["train_type=lora", "lora_r=4", "lora_alpha=8", "lora_dropout=0.0"], "full": ["train_type=full"]}
    with ThreadPoolExecutor(2) as ex:
        futs = {k: ex.submit(run_train, [*common, *extra, f"output_dir={root / k}"]) for k, extra in jobs.items()}
        for f in futs.values():
            f.result()
    return root


def _probe(model, tok):
    ids = tok(["X:1\nT:Probe\nM:6/8\nK:D\n|:dAF A2B|c3 d2e:|", "Human: a reel </s> Assistant: X:1"],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits.float()


@pytest.mark.slow
def test_zero3_checkpoint_to_hf_dir_loads_with_plain_transformers(zero3_runs, tmp_path):
    """The DeepSpeed checkpoint (zero_to_fp32 reconstruction, model rebuilt from tunesmith.json) becomes an
    HF dir that plain transformers loads and that equals the engine's own HF export (which the engine
    checked against its live logits), for LoRA and full training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.loading import load_model
    from training.merge import main

    for kind in ("lora", "full"):
        run = zero3_runs / kind
        ckpt = run / "checkpoints" / "step-00000002"
        assert (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()  # a real ZeRO checkpoint
        meta = json.loads((ckpt / "tunesmith.json").read_text())
        assert meta["zero_stage"] == 3 and meta["train_type"] == kind
        out = tmp_path / f"hf_{kind}"
        src = run if kind == "lora" else ckpt  # OUTPUT_DIR (via checkpoints/latest) or an explicit step dir
        assert main(["--deepspeed_checkpoint", str(src), "--output_dir", str(out)]) == 0
        info = json.loads((out / "merge_info.json").read_text())
        assert info["verified"] and info["checkpoint"] == str(ckpt)

        merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers: no peft, no tunesmith
        tok = AutoTokenizer.from_pretrained(out)
        assert merged.config.vocab_size == len(tok) and tok.pad_token_id != tok.eos_token_id
        if kind == "lora":
            export = load_model(str(run / "base_model"), str(run / "final"), device="cpu", dtype="fp32")
        else:
            export = load_model(str(run / "final"), device="cpu", dtype="fp32")
        ref = _probe(export.model, export.tokenizer)
        base = load_model(meta["base_model_dir"] or str(run / "final"), device="cpu", dtype="fp32")
        got = _probe(merged, tok)
        assert (got - ref).abs().max().item() < 1e-4, kind
        if kind == "lora":  # the trained adapter really changes the model
            assert (got - _probe(base.model, base.tokenizer)).abs().max().item() > 1e-3

    # the adapter exported by the engine merges to the same model as the DeepSpeed checkpoint
    out2 = tmp_path / "hf_lora_from_adapter"
    assert main(["--base_model", str(zero3_runs / "lora" / "base_model"), "--lora_model",
                 str(zero3_runs / "lora" / "final"), "--output_dir", str(out2)]) == 0
    a = AutoModelForCausalLM.from_pretrained(out2).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_lora").eval()
    tok = AutoTokenizer.from_pretrained(out2)
    assert (_probe(a, tok) - _probe(b, tok)).abs().max().item() < 1e-5


class _RunsCode:
    """Unpickling this calls ``pathlib.Path.touch(marker)``: the stand-in for any code a crafted pickle runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


@pytest.mark.slow
def test_a_crafted_checkpoint_is_refused_without_running_its_code(zero3_runs, tmp_path):
    """A DeepSpeed checkpoint whose torch file carries a pickled callable: merge refuses it in one line
    (weights_only=True first, for every .pt, before DeepSpeed's own reader unpickles anything) and the code
    never runs. Both the model-states file and a ZeRO optimizer-states file are checked."""
    import shutil

    from training.merge import main

    for victim in ("model_states", "optim_states"):
        run = tmp_path / f"run_{victim}"
        shutil.copytree(zero3_runs / "lora", run)
        f = next((run / "checkpoints" / "step-00000002").glob(f"*{victim}.pt"))
        state = torch.load(f, map_location="cpu", weights_only=False)  # our own file, from the fixture's run
        marker = tmp_path / f"pwned_{victim}"
        state["evil"] = _RunsCode(str(marker))
        torch.save(state, f)
        with pytest.raises(ArgumentError, match=r"refused -- it does not load with torch.load\(weights_only=True\)"):
            main.__wrapped__(["--deepspeed_checkpoint", str(run), "--output_dir", str(tmp_path / f"out_{victim}")])
        assert not marker.exists()
        assert not (tmp_path / f"out_{victim}").exists()
