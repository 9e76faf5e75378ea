"""Residual add followed by LayerNorm, the reduction that closes every encoder sub-block."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_layernorm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dim, with the model's own eps. x, residual: [tokens, hidden]."""
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def add_layernorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """Dispatcher; see add_layernorm_reference."""
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    return add_layernorm_reference(x, residual, weight, bias, eps)
