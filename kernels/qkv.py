"""Split the fused QKV projection into Q, K, V with their bias added, laid out for attention.

qkv: [tokens, 3 * hidden] (as the fused GEMM writes it) -> out: [3, tokens, hidden], i.e. q, k, v
each [tokens, heads, head_dim] and contiguous. One element-wise pass: reads and writes are both
contiguous along hidden, and the bias add rides along for free.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels import cuda

CUDA_SOURCE = r"""
extern "C" __global__ void split_qkv(
    const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
    long long tokens, int hidden, int has_bias)
{
    const long long total = tokens * 3 * hidden;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / (3 * hidden);
        const int j = (int)(i - t * 3 * hidden);  // column in [0, 3 * hidden)
        const int which = j / hidden;
        const int h = j - which * hidden;
        float v = to_f(qkv[i]) + (has_bias ? to_f(bias[j]) : 0.f);
        out[(long long)which * tokens * hidden + t * hidden + h] = from_f(v);
    }
}

// The same a 16-byte pack at a time (hidden a multiple of PACK_VEC, aligned tensors): a pack never straddles Q, K
// and V, so it moves whole.
extern "C" __global__ void split_qkv_vec(
    const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
    long long tokens, int hidden_packs, int has_bias)
{
    const Pack* src = reinterpret_cast<const Pack*>(qkv);
    const Pack* bp = reinterpret_cast<const Pack*>(bias);
    Pack* dst = reinterpret_cast<Pack*>(out);
    const long long total = tokens * 3 * hidden_packs;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / (3 * hidden_packs);
        const int j = (int)(i - t * 3 * hidden_packs);  // pack column in [0, 3 * hidden_packs)
        const int which = j / hidden_packs;
        const Pack a = src[i];
        const Pack b = bp[has_bias ? j : 0];
        Pack o;
        for (int e = 0; e < PACK_VEC; ++e) o.v[e] = from_f(to_f(a.v[e]) + (has_bias ? to_f(b.v[e]) : 0.f));
        dst[(long long)which * tokens * hidden_packs + t * hidden_packs + (j - which * hidden_packs)] = o;
    }
}
"""


def split_qkv_reference(qkv: torch.Tensor, bias: torch.Tensor | None, num_heads: int):
    """(q, k, v), each [tokens, heads, head_dim]; views of qkv when there is no bias to add."""
    tokens, three_hidden = qkv.shape
    if bias is not None:
        qkv = qkv + bias
    q, k, v = qkv.view(tokens, 3, num_heads, three_hidden // 3 // num_heads).unbind(1)
    return q, k, v


def split_qkv(qkv: torch.Tensor, bias: torch.Tensor | None, num_heads: int, out: torch.Tensor | None = None):
    """Dispatcher: the CUDA kernel for CUDA tensors (contiguous outputs), the reference otherwise.

    out: optional [3, tokens, hidden] tensor the CUDA kernel writes (the reference returns views or
    new tensors and ignores it).
    """
    if qkv.dim() != 2 or qkv.shape[1] % 3 or (qkv.shape[1] // 3) % num_heads:
        raise ValueError(f"qkv must be [tokens, 3*hidden] with hidden divisible by {num_heads=}; got {tuple(qkv.shape)}")
    if not cuda.use_kernels(qkv):
        return split_qkv_reference(qkv, bias, num_heads)
    tokens, three_hidden = qkv.shape
    hidden = three_hidden // 3
    cuda.check_cuda_tensor(qkv, "qkv", qkv.dtype)
    if bias is not None:
        cuda.check_cuda_tensor(bias, "bias", qkv.dtype, (three_hidden,))
    out = cuda.output(out, (3, tokens, hidden), qkv)
    total = qkv.numel()
    vec = 16 // qkv.element_size()
    if total and hidden % vec == 0 and cuda.aligned(qkv, out, *([bias] if bias is not None else [])):
        packs = total // vec
        cuda.launch(CUDA_SOURCE, "split_qkv_vec", qkv.dtype, (min((packs + 255) // 256, 65535),), (256,),
                    (qkv, bias if bias is not None else qkv, out, np.int64(tokens), hidden // vec, bias is not None))
    elif total:
        blocks = min((total + 255) // 256, 65535)
        cuda.launch(CUDA_SOURCE, "split_qkv", qkv.dtype, (blocks,), (256,),
                    (qkv, bias if bias is not None else qkv, out, np.int64(tokens), hidden, bias is not None))
    q, k, v = out.view(3, tokens, num_heads, hidden // num_heads).unbind(0)
    return q, k, v
