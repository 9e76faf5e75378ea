"""Bias-free activations of the feed-forward block, named as Hugging Face configs name them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


def activation_reference(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Apply the activation `kind` (gelu, gelu_new, gelu_pytorch_tanh, relu, silu) to x."""
    if kind in _APPROXIMATE:
        return F.gelu(x, approximate=_APPROXIMATE[kind])
    if kind == "relu":
        return F.relu(x)
    if kind in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"unsupported activation {kind!r}")


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Dispatcher for the feed-forward activation; x: [tokens, intermediate]."""
    return activation_reference(x, kind)


def check_activation(kind: str) -> None:
    """Raise ValueError at load time for an activation this module cannot run."""
    if kind not in _APPROXIMATE and kind not in ("relu", "silu", "swish"):
        raise ValueError(f"unsupported activation {kind!r}")
