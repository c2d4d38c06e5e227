"""Activation memory of a training job, estimated before the model is built (the ZeRO estimate covers only
the model states: weights, gradients, optimizer).

Rather than a hand formula (which depends on the attention kernel, the norm's upcasts, PEFT's dropout copies,
...), the bytes autograd keeps for backward are *measured* on a probe: the job's architecture cut to 1 and 2
decoder layers (a tiny vocabulary), with the job's LoRA config, dtype and attention implementation, on the
training device, at two sequence lengths. ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor saved
for backward; distinct storages are summed, parameters excluded. The 2-layer minus 1-layer difference is one
decoder layer; the two lengths separate the ``a*s`` part from an ``c*s^2`` part (eager attention's
probabilities; 0 with SDPA's fused kernels). Then, per micro-batch of ``s`` tokens:

* a checkpointed layer keeps only its input (``s*h`` elements); one layer's full activations come back during
  its recompute in backward;
* while a layer runs its backward, the gradients of its activations exist next to them: one more layer's worth;
* the loss: the chunked loss keeps the last hidden state and one chunk of fp32 logits at a time; the HF logits
  loss keeps ``s*V`` logits in fp32 plus their gradient.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch


def saved_bytes(model: torch.nn.Module, fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@dataclass
class LayerActivations:
    per_token: float        # bytes per token per decoder layer (the s-linear part)
    per_token_sq: float     # bytes per token^2 per decoder layer (0 for fused attention kernels)
    hidden_bytes: int       # bytes of one token's hidden state (what a checkpointed layer keeps)

    def layer_bytes(self, tokens_per_seq: int, seqs: int) -> float:
        return seqs * (self.per_token * tokens_per_seq + self.per_token_sq * tokens_per_seq ** 2)


def _probe_model(mcfg, n_layers: int, dtype, attn: str, lora: dict | None, device):
    from transformers import AutoModelForCausalLM

    c = copy.deepcopy(mcfg)
    c.num_hidden_layers = n_layers
    c.vocab_size = 64
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(c, k, None) is not None and getattr(c, k) >= 64:
            setattr(c, k, 0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(c, attn_implementation=attn, dtype=dtype)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", bias="none", **lora))
    else:
        model.requires_grad_(True)
    model.train()
    return model


def probe_layer(mcfg, dtype=torch.float32, attn: str = "sdpa", lora: dict | None = None,
                device: str | torch.device = "cpu", lengths: tuple[int, int] = (64, 128)) -> LayerActivations:
    """Measures one decoder layer's saved activations (see module docstring). ``lora``: LoraConfig kwargs
    (r, lora_alpha, lora_dropout, target_modules) or None for full training."""
    h = mcfg.hidden_size
    per = {}
    for n_layers in (1, 2):
        model = _probe_model(mcfg, n_layers, dtype, attn, lora, device)
        decoder = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_decoder()
        for s in lengths:
            x = torch.randn(1, s, h, dtype=dtype, device=device, requires_grad=True)
            pos = torch.arange(s, device=device)[None]
            per[n_layers, s] = saved_bytes(model, lambda: decoder(inputs_embeds=x, position_ids=pos, use_cache=False))
        del model
    (s1, s2) = lengths
    b1, b2 = per[2, s1] - per[1, s1], per[2, s2] - per[1, s2]
    # b(s) = a*s + c*s^2 through the two points
    c = max(0.0, (b2 / s2 - b1 / s1) / (s2 - s1))
    a = max(0.0, b1 / s1 - c * s1)
    return LayerActivations(a, c, h * torch.finfo(dtype).bits // 8)


def estimate_activations(layer: LayerActivations, n_layers: int, seq_len: int, micro_batch: int,
                         checkpoint_every: int | None, vocab: int, loss: str, chunk_size: int,
                         dtype_bytes: int) -> dict:
    """Peak activation bytes of one micro-batch's forward+backward. ``checkpoint_every``: None = no gradient
    checkpointing, K = layers 0, K, 2K, ... are checkpointed. ``loss``: chunked | hf."""
    full = layer.layer_bytes(seq_len, micro_batch)
    kept_input = micro_batch * seq_len * layer.hidden_bytes
    n_ckpt = 0 if checkpoint_every is None else len(range(0, n_layers, checkpoint_every))
    layers = (n_layers - n_ckpt) * full + n_ckpt * kept_input + (full if n_ckpt else 0) + full  # + backward grads
    tokens = micro_batch * seq_len
    if loss == "chunked":
        head = tokens * layer.hidden_bytes + min(chunk_size, tokens) * vocab * (4 + dtype_bytes)
    else:  # logits in the model dtype, their fp32 copy kept by cross-entropy, and its fp32 gradient
        head = tokens * vocab * (dtype_bytes + 4 + 4)
    return {"layers_bytes": int(layers), "loss_bytes": int(head), "total_bytes": int(layers + head),
            "checkpointed_layers": n_ckpt, "layer": asdict(layer)}
