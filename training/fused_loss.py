"""Chunked linear + cross-entropy: the causal-LM loss without materialising full fp32 logits.

The plain HF path computes ``logits = hidden @ W.T`` for every token (``[tokens, V]`` in bf16), then
``logits.float()`` (another ``[tokens, V]`` in fp32), then cross-entropy, and autograd keeps the fp32
logits *and* their gradient alive until backward. For a 32k vocabulary, 2048-token blocks and micro
batch 4 that is 8192 x 32000 x 4 B = 1 GiB per fp32 copy -- several GiB at the peak, which is what makes
"7B LoRA + trainable embeddings in 24 GB" fail.

:class:`ChunkedLinearCrossEntropy` processes ``chunk_size`` tokens at a time: logits of one chunk
(upcast to fp32), log-sum-exp, loss, and -- because the gradient of cross-entropy w.r.t. the logits is
known in closed form, ``softmax - onehot`` -- the gradients w.r.t. the hidden states and the weight, right
away in the forward pass. Only the chunk's logits ever exist, so peak extra memory is
``chunk_size x V x 4`` bytes. Backward just scales the stored gradients by the incoming gradient.
This is the Liger-kernel "fused linear cross entropy" idea in plain PyTorch (no Triton), so it runs on
CPU and GPU alike.

Cost: the same matmuls as the unfused path (forward 2*h*V, backward 4*h*V per token); the backward work
is done inside forward, so call it only when a backward follows (training), and use ordinary logits for
generation/eval when you need them.

Wiring (the engine, ``training/train.py::token_losses``): :class:`ChunkedLossHead` runs the model through
the DeepSpeed engine's forward as usual but with ``logits_to_keep`` = an empty index tensor, so lm_head
multiplies nothing; a forward hook on the decoder (``get_decoder()``) captures ``last_hidden_state``
(after the final norm) and the loss is computed from it and ``get_output_embeddings().weight``. Those
resolve through PEFT (LoRA layers are injected in place and ``ModulesToSaveWrapper.weight`` is the trainable
copy). Under ZeRO-3 the lm_head weight is whole only inside its owning module's forward (DeepSpeed gathers it
in a pre-forward hook, releases it after, and re-gathers it for backward through hooks on the module's inputs
and outputs), so the loss runs *as that module's forward*: the returned weight gradient is then reduce-scattered
like any linear layer's. Not usable -- :func:`chunked_unsupported` says why -- when lm_head itself is a LoRA
layer (its weight is not the effective one) or when the model's forward has no ``logits_to_keep``; the engine
then uses the HF logits path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(hidden @ weight.T, targets, ignore_index, reduction="sum") / divisor``, chunked.

    ``hidden`` ``[T, h]``, ``weight`` ``[V, h]``, ``targets`` ``[T]`` (``ignore_index`` = no loss).
    The returned scalar is a sum over valid tokens divided by ``divisor`` (the caller passes the number
    of valid tokens for a mean, or a global count for gradient-accumulation-correct normalisation).
    ``token_out`` (optional, ``[T]`` float32): filled with each token's loss (0 where ignored), no gradient --
    what per-source losses are summed from.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, chunk_size, ignore_index, token_out=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # float64 only for gradcheck
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size]
            logits = (h @ weight.t()).to(acc)                      # [c, V]: the only vocabulary-wide tensor
            valid = t != ignore_index
            safe_t = torch.where(valid, t, torch.zeros_like(t))
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            per_token = (lse - target_logit) * valid
            total += per_token.sum()
            if token_out is not None:
                token_out[start:start + chunk_size] = per_token
            if need_h or need_w:
                # d(sum of losses)/d(logits) = softmax - onehot on valid rows, 0 on ignored rows
                g = torch.exp(logits.sub_(lse[:, None]))             # softmax, reusing the logits' memory
                g.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse)[:, None])
                g.mul_(valid[:, None])
                g = g.to(weight.dtype)                               # matmuls in the model's dtype (bf16 on GPU)
                if need_h:
                    grad_h[start:start + chunk_size] = g @ weight
                if need_w:
                    if g.dtype == acc:
                        grad_w.addmm_(g.t(), h)
                    else:                                            # per-chunk bf16 GEMM, fp32 accumulation
                        grad_w += (g.t() @ h.to(g.dtype)).to(acc)
        divisor = float(divisor)
        if need_h:
            grad_h.div_(divisor)
        if need_w:
            grad_w = grad_w.div_(divisor).to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


@torch.no_grad()
def _chunked_ce_sum_nograd(hidden, weight, targets, chunk_size, ignore_index, token_out=None) -> torch.Tensor:
    """Forward only (eval): sum of token losses, one chunk of logits at a time."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        t = targets[start:start + chunk_size]
        logits = (hidden[start:start + chunk_size] @ weight.t()).float()
        if token_out is None:
            total += F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
        else:
            per_token = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="none")
            token_out[start:start + chunk_size] = per_token
            total += per_token.sum()
    return total


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = 1024, ignore_index: int = -100,
                          num_items: int | torch.Tensor | None = None,
                          token_out: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` over non-ignored tokens (or the sum
    divided by ``num_items``), equal to ``F.cross_entropy(logits.float(), targets)`` in value and gradient.

    ``hidden`` may have any leading shape (``[..., h]``); ``targets`` the same leading shape. ``token_out``: a
    float32 tensor of ``targets``' size that receives each token's loss (0 where ignored).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(h.device)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"targets have {t.shape[0]} tokens but hidden has {h.shape[0]}")
    if num_items is None:
        num_items = (t != ignore_index).sum().clamp_min(1).item()
    elif isinstance(num_items, torch.Tensor):
        num_items = num_items.item()
    out = None if token_out is None else token_out.view(-1)
    if not torch.is_grad_enabled():  # eval: autograd.Function would still compute the gradients in forward
        return _chunked_ce_sum_nograd(h, weight, t, chunk_size, ignore_index, out) / float(num_items)
    return ChunkedLinearCrossEntropy.apply(h, weight, t, num_items, chunk_size, ignore_index, out)


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           chunk_size: int = 1024, ignore_index: int = -100,
                           num_items: int | torch.Tensor | None = None,
                           token_out: torch.Tensor | None = None) -> torch.Tensor:
    """The HF causal-LM loss (``ForCausalLMLoss``: position i predicts label i+1, ``-100`` ignored) from the
    last hidden states ``[B, S, h]`` and the lm_head weight, without full logits."""
    shift = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return chunked_cross_entropy(hidden, weight, shift, chunk_size, ignore_index, num_items, token_out)


# ------------------------------------------------------------------------------------------------
# wiring into a (DeepSpeed-wrapped, maybe PEFT) HF causal LM
# ------------------------------------------------------------------------------------------------
def unwrap_causal_lm(model):
    """The HF ``*ForCausalLM`` under a DeepSpeed engine and/or a PEFT wrapper."""
    inner = getattr(model, "module", None)
    if isinstance(inner, torch.nn.Module) and hasattr(model, "backward"):   # DeepSpeedEngine -> its module
        model = inner
    if hasattr(model, "get_base_model"):               # PeftModel -> the HF model (LoRA injected in place)
        model = model.get_base_model()
    return model


def chunked_unsupported(model) -> str | None:
    """Why the chunked loss cannot be used on ``model`` (a reason to print), or None when it can."""
    import inspect

    base = unwrap_causal_lm(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward has no logits_to_keep argument"
    head = base.get_output_embeddings()
    if head is None or not hasattr(base, "get_decoder"):
        return f"{type(base).__name__} has no output embeddings / decoder accessors"
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(head, BaseTunerLayer):
            return "lm_head is itself a LoRA layer (its weight is not the effective weight)"
    except ImportError:  # no peft: no LoRA layers either
        pass
    if getattr(head, "bias", None) is not None:
        return "lm_head has a bias"
    return None


class ChunkedLossHead:
    """``head(engine, input_ids=..., labels=..., ...)`` -> sum of next-token cross-entropies over the targets,
    computed by :func:`chunked_causal_lm_loss` from the decoder's last hidden state -- the full logits
    tensor never exists. The forward itself still goes through ``engine(...)`` (DeepSpeed's hooks, autocast,
    gradient checkpointing, PEFT) with ``logits_to_keep`` = an empty index tensor."""

    def __init__(self, model, chunk_size: int = 1024):
        base = unwrap_causal_lm(model)
        self.decoder = base.get_decoder()
        self.head = base.get_output_embeddings()
        self.chunk_size = chunk_size

    def _owner(self) -> torch.nn.Module:
        """The module that holds the effective lm_head weight as its own parameter (PEFT's ModulesToSaveWrapper
        delegates ``.weight`` to its active trainable copy): ZeRO-3 gathers a module's direct parameters only."""
        w = self.head.weight
        for m in self.head.modules():
            if m._parameters.get("weight") is w:
                return m
        raise RuntimeError(f"no submodule of {type(self.head).__name__} owns its weight")

    @property
    def partitioned(self) -> bool:
        """True under ZeRO-3: the lm_head weight is a partitioned DeepSpeed parameter."""
        return hasattr(self.head.weight, "ds_id")

    def loss_from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor,
                         token_out: torch.Tensor | None = None) -> torch.Tensor:
        if not self.partitioned:  # whole on every rank (ZeRO 0-2, no DeepSpeed)
            return chunked_causal_lm_loss(hidden, self.head.weight, labels, self.chunk_size, num_items=1,
                                          token_out=token_out)
        owner = self._owner()

        def forward(h):  # runs between DeepSpeed's gather and release hooks of `owner`
            return chunked_causal_lm_loss(h, owner.weight, labels, self.chunk_size, num_items=1, token_out=token_out)

        owner.forward = forward  # an instance attribute shadows the class's forward for this one call
        try:
            return owner(hidden)
        finally:
            del owner.forward

    def __call__(self, engine, labels: torch.Tensor, token_out: torch.Tensor | None = None, **inputs) -> torch.Tensor:
        """``token_out``: a float32 tensor shaped like ``labels`` that receives each position's loss."""
        captured = {}

        def grab(_module, _args, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        handle = self.decoder.register_forward_hook(grab)
        try:
            engine(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=labels.device), use_cache=False)
        finally:
            handle.remove()
        return self.loss_from_hidden(captured.pop("h"), labels, token_out)
