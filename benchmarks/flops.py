"""FLOP accounting and device peaks for throughput / MFU / bandwidth figures.

Everything here counts *model* FLOPs of dense matrix multiplies (one multiply-add = 2 FLOPs) per
trained token; elementwise work (norms, activations, softmax, RoPE, the optimizer) is not counted, as
in PaLM (Chowdhery et al. 2022, appendix B), Megatron-LM and torchtitan. MFU is then

    MFU = tokens_per_second_per_device * flops_per_token / peak_flops_per_device

Notation (LLaMA): ``L`` layers, ``h`` hidden size (= heads * head_dim of the *query* heads), ``s`` the
attention span (sequence length of a packed block), ``V`` vocabulary, ``r`` LoRA rank.

``N`` = parameters that take part in a matmul per token: every linear weight of the ``L`` blocks
(q, k, v, o, gate, up, down) plus ``lm_head`` (``V*h``). Not in ``N``: the input embedding (a row
gather, 0 FLOPs) and the RMSNorm weights (elementwise). With ``tie_word_embeddings`` the shared matrix
is counted once, as the lm_head matmul.

Full training (all weights trainable)::

    flops/token = 6*N + 6*L*s*h
                  |      `-- attention scores QK^T and weights*V: forward 2 matmuls of 2*s*h FLOPs
                  |          each per token and layer (4*L*s*h), backward twice that (12*L*s*h in
                  |          total, the PaLM-appendix term "12*L*H*Q*T"), HALVED for causal
                  |          attention because the masked upper triangle is never computed by
                  |          flash/SDPA kernels -> 6*L*s*h.
                  `-- forward 2N, backward 4N (activation gradient 2N + weight gradient 2N)

    ``attention="palm"`` selects the un-halved 12*L*s*h term instead (torchtitan's convention; gives
    higher MFU numbers -- use it only to compare with figures that used it).

LoRA (frozen base weights; honest count, no weight gradient for frozen weights)::

    flops/token = 2*N            forward through the base
                + 2*N            activation gradient through the base (needed to reach every adapter
                                 and trainable module below; the very first layer's input gradient,
                                 skippable when embeddings are frozen, is still counted: < 1/L)
                + 6*N_lora       adapters: forward x@A, (xA)@B = 2*r*(in+out), backward 2x that
                + 2*N_trainable_mm  weight gradient of full-trained matmul modules (modules_to_save:
                                 lm_head -> 2*V*h; the same formula for any other fully trained linear)
                + 0              trainable input embedding: its weight gradient is a scatter-add of h
                                 numbers per token, not a matmul (same as its forward gather)
                + 6*L*s*h        attention (activation x activation matmuls: forward and all backward
                                 terms are needed whether or not weights train), causal-halved

So LoRA + trainable embeddings + lm_head costs ~4N + 2*V*h + adapters -- about 2/3 of full training,
and a LoRA MFU computed with 6N would overstate utilisation by ~50 %.

Gradient checkpointing recomputes the forward of the checkpointed decoder layers: that is *hardware* FLOPs
(HFU), not model FLOPs; pass ``recompute=True`` (every layer) or the fraction of layers checkpointed to
:func:`train_flops_per_token` to get the HFU numerator (adds fraction x (2*N_body (+2*N_lora) + 2*L*s*h
causal); the lm_head is outside the layers and is not recomputed).

Sequence packing with per-document (block-diagonal) attention computes less attention than ``s`` would
say; by convention the formula still uses the block length ``s`` (the attention term is ~4 % of the
total for 7B at s=2048, so this overstates at most that much).

Peaks: :data:`GPU_PEAKS` holds vendor dense (no 2:4 sparsity) tensor-core peaks; on CPU the peak is
*measured* (:func:`measure_cpu_matmul_flops`: best of several large fp32 matmuls), so CPU "MFU" means
"fraction of what this CPU's BLAS reaches on one big GEMM right now" -- meaningful for comparisons on one
machine, not across machines.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

# --------------------------------------------------------------------------------------------- models

LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """The numbers the FLOP formulas need, taken from a LlamaConfig (or given by hand in tests)."""

    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    tie_embeddings: bool = False

    @classmethod
    def from_config(cls, cfg) -> Shape:
        return cls(n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                   n_heads=cfg.num_attention_heads,
                   n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                   vocab=cfg.vocab_size, tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear module of one decoder block."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def body_matmul_params(self) -> int:
        return self.n_layers * sum(a * b for a, b in self.linear_shapes().values())

    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    def matmul_params(self) -> int:
        """``N`` of the module docstring: block linears + lm_head (embedding gather and norms excluded)."""
        return self.body_matmul_params() + self.lm_head_params()

    def lora_params(self, r: int, target_modules=LORA_DEFAULT_TARGETS) -> int:
        """Adapter parameters: r*(in+out) per targeted linear per layer."""
        shapes = self.linear_shapes()
        unknown = [m for m in target_modules if m not in shapes]
        if unknown:
            raise ValueError(f"LoRA target_modules {unknown} are not LLaMA block linears {sorted(shapes)}")
        return self.n_layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in target_modules)


@dataclass(frozen=True)
class FlopCount:
    """Per-token FLOPs split by term (all fields are FLOPs per trained token)."""

    forward: float          # base matmuls forward (2N)
    backward_act: float     # activation gradients through the base (2N)
    backward_weight: float  # weight gradients of trainable full matrices (2N full; 2*V*h for a trained lm_head)
    adapters: float         # 6 * N_lora
    attention: float        # 6*L*s*h causal (12*L*s*h "palm")
    recompute: float = 0.0  # extra forward of gradient checkpointing (HFU only)

    @property
    def model(self) -> float:
        """Model FLOPs per token (the MFU numerator)."""
        return self.forward + self.backward_act + self.backward_weight + self.adapters + self.attention

    @property
    def hardware(self) -> float:
        """Model FLOPs + recomputation (the HFU numerator)."""
        return self.model + self.recompute

    def as_dict(self) -> dict:
        return {**asdict(self), "model": self.model, "hardware": self.hardware}


def attention_flops_per_token(shape: Shape, seq_len: int, attention: str = "causal") -> float:
    """Forward+backward FLOPs per token of the two activation matmuls (QK^T, PV) over all layers."""
    if attention not in ("causal", "palm"):
        raise ValueError(f"attention convention must be 'causal' or 'palm', got {attention!r}")
    full = 12.0 * shape.n_layers * seq_len * shape.hidden
    return full / 2 if attention == "causal" else full


def document_attention_span(pos) -> float:
    """The ``seq_len`` to give the attention FLOPs of block-diagonal (per-document) attention over packed rows
    with position ids ``pos`` [B, L] (restarting at 0 per document; a row start is a document start). The causal
    convention counts ``L^2 / 2`` query-key pairs for an ``L``-token sequence (``L / 2`` per token); over
    documents of ``l`` tokens that is ``sum l^2 / 2`` pairs, so ``span = sum l^2 / sum l`` (``L`` for one
    document per row)."""
    import numpy as np

    pos = np.asarray(pos)
    start = pos == 0
    start[:, 0] = True
    idx = np.append(np.flatnonzero(start.reshape(-1)), pos.size)
    lengths = np.diff(idx).astype(np.float64)
    return float((lengths ** 2).sum() / lengths.sum())


def train_flops_per_token(shape: Shape, seq_len: int, train_type: str = "full", lora_r: int = 0,
                          lora_targets=LORA_DEFAULT_TARGETS, trainable_embed: bool = False,
                          trainable_lm_head: bool = False, attention: str = "causal",
                          recompute: bool | float = False) -> FlopCount:
    """FLOPs per trained token of one optimizer step's forward+backward (see module docstring).

    ``train_type`` ``full``: every weight trains (``lora_*``/``trainable_*`` ignored).
    ``lora``: base frozen; adapters of rank ``lora_r`` on ``lora_targets``; ``trainable_embed`` /
    ``trainable_lm_head`` for PEFT ``modules_to_save``.
    """
    n = float(shape.matmul_params())
    attn = attention_flops_per_token(shape, seq_len, attention)
    frac = float(recompute)  # True = every decoder layer is checkpointed
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"recompute must be a bool or a fraction of layers in [0, 1], got {recompute!r}")
    body = float(shape.body_matmul_params())
    if train_type == "full":
        rec = frac * (2 * body + attn / 3)
        return FlopCount(forward=2 * n, backward_act=2 * n, backward_weight=2 * n, adapters=0.0, attention=attn,
                         recompute=rec)
    if train_type != "lora":
        raise ValueError(f"train_type must be 'full' or 'lora', got {train_type!r}")
    if lora_r <= 0:
        raise ValueError("train_type='lora' needs lora_r > 0")
    n_lora = float(shape.lora_params(lora_r, lora_targets))
    weight_grad = 0.0
    if trainable_lm_head or (trainable_embed and shape.tie_embeddings):
        weight_grad += 2.0 * shape.lm_head_params()
    # trainable_embed (untied): scatter-add weight gradient, 0 matmul FLOPs by convention
    rec = frac * (2 * body + 2 * n_lora + attn / 3)
    return FlopCount(forward=2 * n, backward_act=2 * n, backward_weight=weight_grad, adapters=6 * n_lora,
                     attention=attn, recompute=rec)


def decode_bytes_per_step(shape: Shape, batch: int, context: int, bytes_per_param: int,
                          kv_bytes: int | None = None) -> dict:
    """Bytes a decode step must read from device memory at least once: all matmul weights (block linears
    + lm_head + norms), the ``batch`` embedding rows looked up, and the KV cache of ``context`` tokens
    per sequence (K and V, every layer). The lower bound on step time is bytes / bandwidth."""
    kv_bytes = bytes_per_param if kv_bytes is None else kv_bytes
    weights = (shape.matmul_params() + shape.n_layers * 2 * shape.hidden + shape.hidden) * bytes_per_param
    emb_rows = batch * shape.hidden * bytes_per_param
    kv = 2 * shape.n_layers * shape.kv_dim * context * batch * kv_bytes
    return {"weights": weights, "embedding_rows": emb_rows, "kv_cache": kv, "total": weights + emb_rows + kv}


# -------------------------------------------------------------------------------------------- devices

# Dense (no sparsity) tensor-core peaks in FLOP/s for bf16/fp16 inputs with fp32 accumulation, from
# NVIDIA's datasheets. TF32 (what fp32 matmuls use with allow_tf32) is half of that on these parts.
GPU_PEAKS: dict[str, float] = {
    "H200": 989.4e12,
    "H100 SXM": 989.4e12,   # also "H100 80GB HBM3"
    "H100 PCIe": 756.5e12,
    "H800": 989.4e12,
    "A100": 312e12,
    "A800": 312e12,
}
# HBM bandwidth in bytes/s (datasheets).
GPU_BANDWIDTH: dict[str, float] = {
    "H200": 4.8e12,
    "H100 SXM": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H800": 3.35e12,
    "A100": 2.039e12,        # 80GB SXM; the 40GB part is 1.555e12
    "A800": 2.039e12,
}


def gpu_key(name: str) -> str | None:
    """Maps ``torch.cuda.get_device_name()`` to a table key (None when unknown)."""
    n = name.upper()
    if "H200" in n:
        return "H200"
    if "H800" in n:
        return "H800"
    if "H100" in n:
        return "H100 PCIe" if "PCIE" in n else "H100 SXM"
    if "A800" in n:
        return "A800"
    if "A100" in n:
        return "A100"
    return None


_CPU_CACHE: dict[str, float] = {}


def measure_cpu_matmul_flops(n: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Measured CPU peak: best FLOP/s of ``reps`` ``n x n @ n x n`` matmuls (2*n^3 FLOPs each) with the
    current torch thread count. Cached per process. Depends on what else runs on the machine."""
    key = f"mm{n}-{dtype}-{torch.get_num_threads()}"
    if key not in _CPU_CACHE:
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm-up (BLAS thread pool, page faults)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
        _CPU_CACHE[key] = 2.0 * n**3 / best
    return _CPU_CACHE[key]


def measure_cpu_bandwidth(mbytes: int = 256, reps: int = 5) -> float:
    """Measured CPU memory bandwidth in bytes/s: best of ``reps`` copies of a ``mbytes`` MiB buffer,
    counting read + write (STREAM "copy" convention). Cached per process."""
    key = f"bw{mbytes}-{torch.get_num_threads()}"
    if key not in _CPU_CACHE:
        n = mbytes * 2**20 // 4
        src = torch.ones(n, dtype=torch.float32)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
        _CPU_CACHE[key] = 2.0 * n * 4 / best
    return _CPU_CACHE[key]


@dataclass
class DevicePeak:
    device: str        # human name, e.g. "NVIDIA H100 80GB HBM3" or "cpu (2 threads)"
    flops: float       # peak matmul FLOP/s for the training dtype
    bandwidth: float   # memory bandwidth bytes/s
    source: str        # "datasheet" or "measured"

    def as_dict(self) -> dict:
        return asdict(self)


def device_peak(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> DevicePeak:
    """Peak FLOP/s and bandwidth of ``device``: datasheet for known GPUs, measured for the CPU.

    An unknown GPU raises (an MFU against a guessed peak would be a made-up number); set
    ``TUNESMITH_PEAK_FLOPS`` / ``TUNESMITH_PEAK_BW`` in the environment to supply them.
    """
    import os

    device = torch.device(device)
    if device.type == "cpu":
        return DevicePeak(f"cpu ({torch.get_num_threads()} threads)",
                          measure_cpu_matmul_flops(dtype=torch.float32 if dtype != torch.bfloat16 else dtype),
                          measure_cpu_bandwidth(), "measured")
    name = torch.cuda.get_device_name(device)
    env_f, env_b = os.environ.get("TUNESMITH_PEAK_FLOPS"), os.environ.get("TUNESMITH_PEAK_BW")
    if env_f and env_b:
        return DevicePeak(name, float(env_f), float(env_b), "environment")
    key = gpu_key(name)
    if key is None:
        raise ValueError(f"no datasheet peak for GPU {name!r}; set TUNESMITH_PEAK_FLOPS and TUNESMITH_PEAK_BW "
                         "(FLOP/s, bytes/s) to compute MFU / bandwidth bounds")
    flops = GPU_PEAKS[key] if dtype in (torch.bfloat16, torch.float16) else GPU_PEAKS[key] / 2  # tf32
    return DevicePeak(name, flops, GPU_BANDWIDTH[key], "datasheet")


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of one device."""
    return tokens_per_s * flops_per_token / peak_flops
