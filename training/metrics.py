"""Where training numbers go: console, ``metrics.jsonl``, TensorBoard, wandb, and ``loss_curve.png``.

Only rank 0 writes. ``metrics.jsonl`` is appended to, so a resumed run re-logs the steps after its
checkpoint; readers take the last record of each step (:func:`read_metrics`).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir: Path, report_to: list[str], run_name: str, project: str, config: dict,
                 enabled: bool):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tb"))
        if "wandb" in report_to:
            import wandb  # WANDB_MODE=offline works: the run is written under OUTPUT_DIR/wandb

            self.wandb = wandb.init(project=project, name=run_name or None, config=config, dir=str(output_dir),
                                    resume="allow")

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | Path, key: str) -> dict[int, dict]:
    """{step: last record with ``key``}: the view of a run after any resumes."""
    out: dict[int, dict] = {}
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if key in r:
                out[r["step"]] = r
    return out


def plot_loss_curve(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Train loss (and val loss) per step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_metrics(metrics_path, "loss")
    val = read_metrics(metrics_path, "val_loss")
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = sorted(train)
    ax.plot(steps, [train[s]["loss"] for s in steps], label="train loss", lw=1.2)
    for key in sorted({k for r in train.values() for k in r if k.startswith("loss/")}):  # a mixture's sources
        ss = [s for s in steps if key in train[s]]
        ax.plot(ss, [train[s][key] for s in ss], label=f"train {key}", lw=0.8, alpha=0.7)
    if val:
        vs = sorted(val)
        ax.plot(vs, [val[s]["val_loss"] for s in vs], "o-", label="val loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / target token)")
    ax.set_title(title or str(Path(metrics_path).parent.name))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def format_line(step: int, max_steps: int, rec: dict) -> str:
    gn = rec.get("grad_norm")
    return (f"step {step:>6}/{max_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"tok/s {rec['tokens_per_s']:,.0f} | grad_norm {gn if gn is None else f'{gn:.3f}'} | "
            f"mem {rec['mem_gb']:.2f} GB"
            + "".join(f" | {k} {v:.4f}" for k, v in rec.items() if k.startswith("loss/")))


def safe_exp(x: float) -> float:
    return math.exp(x) if x < 50 else float("inf")
