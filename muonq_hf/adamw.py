"""The AdamW step of MuonQ's AdamW groups: torch's AdamW, with fp32 or blockwise 8-bit moments.

One function for every backend: a single process and the DDP row owners pass the parameter (or a row slice
of it), FSDP2 its local shard, DeepSpeed its flat fp32 partition; ``quantized`` is decided from the whole
parameter's shape (``muonq_hf.state.adamw_quantized``), so every backend stores the same kind of moments.
"""

from __future__ import annotations

import math

import torch

from .codecs import dequantize_dynamic8, quantize_dynamic8
from .state import ADAMW_8BIT_BLOCK, ADAMW_MOMENTS, moment_codebook


def adamw_step(weight: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, quantized: bool) -> None:
    """One AdamW step of ``weight`` (any shape, viewed as (rows, rest) when ``quantized``), state in place."""
    grad = grad.float()
    if not state:
        state["step"] = torch.tensor(0.0)
        for k in ADAMW_MOMENTS:
            if quantized:
                zeros = torch.zeros_like(grad).reshape(weight.shape[0], -1)
                book = moment_codebook(k, grad.device)
                state[f"{k}_codes"], state[f"{k}_absmax"] = quantize_dynamic8(zeros, book, ADAMW_8BIT_BLOCK)
            else:
                state[k] = torch.zeros_like(grad)
    beta1, beta2 = group["betas"]
    state["step"] += 1
    step = state["step"].item()  # a CPU scalar: no device sync
    if quantized:
        exp_avg, exp_avg_sq = (
            dequantize_dynamic8(state[f"{k}_codes"], state[f"{k}_absmax"], moment_codebook(k, grad.device)).view(
                weight.shape
            )
            for k in ADAMW_MOMENTS
        )
    else:
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if quantized:
        for k, value in zip(ADAMW_MOMENTS, (exp_avg, exp_avg_sq), strict=True):
            state[f"{k}_codes"], state[f"{k}_absmax"] = quantize_dynamic8(
                value.reshape(weight.shape[0], -1), moment_codebook(k, grad.device), ADAMW_8BIT_BLOCK
            )
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(group["eps"])
    weight.mul_(1 - group["lr"] * group["weight_decay"])
    if weight.dtype == torch.float32:
        weight.addcdiv_(exp_avg, denom, value=-group["lr"] / bias1)
    else:  # the ratio in fp32: eps = 1e-8 is 0 in fp16, and 0 / 0 turned fp16 weights NaN
        weight.add_((exp_avg / denom).to(weight.dtype), alpha=-group["lr"] / bias1)
