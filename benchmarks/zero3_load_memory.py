"""Memory of building a model for ZeRO-3: inside ``deepspeed.zero.Init`` (what the engine does) vs a plain build
that ``deepspeed.initialize`` partitions afterwards (what it did before 2026-11-30).

    python -m benchmarks.zero3_load_memory --model llama-1b --nproc 2
    python -m benchmarks.zero3_load_memory --model llama-small --nproc 2 --train_type lora

Each mode runs ``--nproc`` real ranks (``torch.distributed.run``) that build the model with
``training.model.build_model`` and then ``deepspeed.initialize`` it with ``ds_configs/zero3.json``. Every rank
reports its peak memory (CPU: peak RSS; GPU: peak allocated) after the build and after initialize, and the
memory it holds once the engine exists. Printed as a table and written as JSON. The figure that matters is the
peak per rank: without zero.Init every rank holds the whole model at once (a 7B bf16 model is 13.5 GB per rank,
8 ranks on a node = 108 GB of host memory before any training).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from data_preprocess.hub import ArgumentError, exit_on_argument_error
from data_preprocess.model_source import resolve_source
from training.config import TrainConfig, detect_environment, fill_ds_config, read_ds_config

REPO = Path(__file__).resolve().parents[1]
MODES = ("zero_init", "plain")


def _mem_gb(device) -> tuple[float, float]:
    """(peak, current) memory of this process in GiB (CPU: RSS; GPU: allocated)."""
    import torch

    from benchmarks.train_throughput import peak_memory  # (here: torch only in the ranks; the launcher stays light)

    if device.type == "cuda":
        return peak_memory(device), torch.cuda.memory_allocated(device) / 2**30
    with open("/proc/self/statm") as f:
        cur = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    return peak_memory(device), cur


def worker(mode: str, model: str, train_type: str, precision: str, out: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from benchmarks.train_throughput import SyntheticVocab  # (here: torch only in the ranks)
    from training.model import build_model, param_groups  # (here: torch only in the ranks)
    from training.presets import PRESETS  # (here: transformers only in the ranks)

    env = detect_environment()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if env.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # smollm2-135m / X.gguf: its imported dir (imported once by main's resolve_model_path; a cache hit here)
    cfg = TrainConfig(model=resolve_source(model), train_type=train_type, ds_config="ds_configs/zero3.json",
                      precision=precision, micro_batch_size=1, global_batch_size=world, report_to=[])
    hidden = PRESETS[model]["hidden_size"] if model in PRESETS else 4096
    ds = fill_ds_config(read_ds_config(cfg), cfg, world, precision, hidden, device.type == "cpu")
    base = _mem_gb(device)
    t = time.perf_counter()
    net, info = build_model(cfg, SyntheticVocab(32000), precision, ds_config=ds if mode == "zero_init" else None,
                            rank=rank)
    built_s = time.perf_counter() - t
    after_build = _mem_gb(device)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=param_groups(net, cfg.weight_decay), config=ds)
    dist.barrier()
    after_init = _mem_gb(device)
    rec = {"rank": rank, "world": world, "mode": mode, "n_params": info.n_params, "build_s": built_s,
           "baseline_gb": base[1], "peak_after_build_gb": after_build[0], "peak_after_initialize_gb": after_init[0],
           "held_after_initialize_gb": after_init[1]}
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(rec))
    dist.barrier()
    dist.destroy_process_group()


@exit_on_argument_error
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-1b", help="training preset (random init) or HF model dir")
    ap.add_argument("--train_type", default="full", choices=("full", "lora"))
    ap.add_argument("--nproc", type=int, default=2, help="ranks (processes) on this machine")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                    help="auto (bf16 GPU, fp32 CPU) | bf16 | fp16 | fp32")
    ap.add_argument("--output", default=None, help="JSON path (default outputs/benchmarks/zero3_load_memory_<model>.json)")
    ap.add_argument("--worker", default=None, choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        precision = a.precision if a.precision != "auto" else ("bf16" if detect_environment().device == "cuda" else "fp32")
        worker(a.worker, a.model, a.train_type, precision, a.worker_out)
        return {}
    if a.nproc < 1:
        raise ArgumentError("--nproc must be >= 1")
    from training.presets import is_preset  # (here: transformers; the launcher stays light)

    if not is_preset(a.model):  # checked once here, not as a traceback from every rank
        from training.hf_io import ModelPathError, resolve_model_path  # (here: torch; the launcher stays light)

        try:
            resolve_model_path(a.model)
        except ModelPathError as e:
            raise ArgumentError(f"error: {e}") from None
    out = Path(a.output or REPO / "outputs" / "benchmarks" / f"zero3_load_memory_{Path(a.model).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = {}
    for mode in MODES:
        stem = str(out.with_suffix("")) + f".{mode}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}", "-m",
               "benchmarks.zero3_load_memory", "--worker", mode, "--worker_out", stem, "--model", a.model,
               "--train_type", a.train_type, "--precision", a.precision]
        print(f"[zero3_load_memory] {mode}: {a.nproc} ranks building {a.model} ({a.train_type})", flush=True)
        p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if p.returncode != 0:
            raise ArgumentError(f"{mode} run failed (exit {p.returncode}):\n" + "\n".join(p.stdout.splitlines()[-30:]))
        ranks = [json.loads(Path(f"{stem}.rank{r}.json").read_text()) for r in range(a.nproc)]
        for r in range(a.nproc):
            Path(f"{stem}.rank{r}.json").unlink()
        results[mode] = {"ranks": ranks, **{k: max(r[k] for r in ranks) for k in (
            "peak_after_build_gb", "peak_after_initialize_gb", "held_after_initialize_gb", "build_s")}}
    z, p_ = results["zero_init"], results["plain"]
    res = {"benchmark": "zero3_load_memory", "model": a.model, "train_type": a.train_type, "nproc": a.nproc,
           "n_params": z["ranks"][0]["n_params"], "results": results,
           "peak_ratio_plain_over_zero_init": p_["peak_after_initialize_gb"] / z["peak_after_initialize_gb"]}
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\n{a.model} {a.train_type}, {res['n_params'] / 1e6:.0f} M parameters, ZeRO-3, {a.nproc} ranks "
          "(max over ranks; CPU = RSS, GPU = allocated)")
    print("| build | peak after build GB | peak after initialize GB | held after initialize GB | build s |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        r = results[mode]
        print(f"| {mode} | {r['peak_after_build_gb']:.2f} | {r['peak_after_initialize_gb']:.2f} | "
              f"{r['held_after_initialize_gb']:.2f} | {r['build_s']:.1f} |")
    print(f"peak per rank, plain / zero.Init: {res['peak_ratio_plain_over_zero_init']:.2f}x  -> {out}")
    return res


if __name__ == "__main__":
    main()
