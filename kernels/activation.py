"""Bias add + activation of the feed-forward block, fused; activations named as Hugging Face names them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kernels import cuda

_KINDS = {"gelu": 0, "gelu_new": 1, "gelu_pytorch_tanh": 1, "gelu_fast": 1, "relu": 2, "silu": 3, "swish": 3}
ACTIVATION_NAMES = tuple(_KINDS)  # every activation name (Hugging Face's) these kernels and activate_ run

CUDA_SOURCE = r"""
extern "C" __global__ void bias_activation(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
    long long total, int cols, int kind, int has_bias)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        float v = to_f(x[i]) + (has_bias ? to_f(bias[i % cols]) : 0.f);
        float y;
        if (kind == 0) y = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));  // exact erf GELU
        else if (kind == 1) y = 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
        else if (kind == 2) y = fmaxf(v, 0.f);
        else y = v / (1.f + __expf(-v));
        out[i] = from_f(y);
    }
}

// The same a 16-byte pack at a time (cols a multiple of PACK_VEC, 16-byte aligned tensors): one index
// computation and one load/store instruction for PACK_VEC values.
__device__ __forceinline__ float activate(float v, int kind) {
    if (kind == 0) return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    if (kind == 1) return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    if (kind == 2) return fmaxf(v, 0.f);
    return v / (1.f + __expf(-v));
}
extern "C" __global__ void bias_activation_vec(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
    long long packs, int col_packs, int kind, int has_bias)
{
    const Pack* xp = reinterpret_cast<const Pack*>(x);
    const Pack* bp = reinterpret_cast<const Pack*>(bias);
    Pack* op = reinterpret_cast<Pack*>(out);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += (long long)gridDim.x * blockDim.x) {
        const Pack a = xp[i];
        const Pack b = bp[has_bias ? (int)(i % col_packs) : 0];
        Pack o;
        for (int j = 0; j < PACK_VEC; ++j) o.v[j] = from_f(activate(to_f(a.v[j]) + (has_bias ? to_f(b.v[j]) : 0.f), kind));
        op[i] = o;
    }
}
"""


def check_activation(kind: str) -> None:
    """Raise ValueError at load time for an activation this module cannot run."""
    if kind not in _KINDS:
        raise ValueError(f"unsupported activation {kind!r}; supported: {', '.join(_KINDS)}")


def activate_(x: torch.Tensor, kind: str) -> torch.Tensor:
    """act(x) in place, in torch (the same kernels as F.gelu / F.relu / F.silu): the CPU path's."""
    code = _KINDS[kind]
    if code in (0, 1):
        return torch.ops.aten.gelu_(x, approximate="none" if code == 0 else "tanh")
    return torch.relu_(x) if code == 2 else F.silu(x, inplace=True)


def bias_activation_reference(x: torch.Tensor, bias: torch.Tensor | None, kind: str,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x + bias) in plain torch. x: [tokens, intermediate]; bias: [intermediate] or None."""
    check_activation(kind)
    if bias is not None:
        x = x + bias
    code = _KINDS[kind]
    if code in (0, 1):
        result = F.gelu(x, approximate="none" if code == 0 else "tanh")
    else:
        result = F.relu(x) if code == 2 else F.silu(x)
    return result if out is None else out.copy_(result)


def bias_activation(x: torch.Tensor, bias: torch.Tensor | None, kind: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatcher: the fused CUDA kernel for CUDA tensors, the reference otherwise.

    out: optional tensor shaped like x to write; it may be x itself (element-wise, so in place is safe).
    """
    check_activation(kind)
    if not cuda.use_kernels(x):
        return bias_activation_reference(x, bias, kind, out)
    cuda.check_cuda_tensor(x, "x", x.dtype)
    cols = x.shape[-1]
    if bias is not None:
        cuda.check_cuda_tensor(bias, "bias", x.dtype, (cols,))
    out = cuda.output(out, tuple(x.shape), x)
    total = x.numel()
    vec = 16 // x.element_size()
    if total and cols % vec == 0 and cuda.aligned(x, out, *([bias] if bias is not None else [])):
        packs = total // vec
        cuda.launch(CUDA_SOURCE, "bias_activation_vec", x.dtype, (min((packs + 255) // 256, 65535),), (256,),
                    (x, bias if bias is not None else x, out, np.int64(packs), cols // vec, _KINDS[kind], bias is not None))
    elif total:
        blocks = min((total + 255) // 256, 65535)
        cuda.launch(CUDA_SOURCE, "bias_activation", x.dtype, (blocks,), (256,),
                    (x, bias if bias is not None else x, out, np.int64(total), cols, _KINDS[kind], bias is not None))
    return out
