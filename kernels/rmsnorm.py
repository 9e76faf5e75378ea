"""Residual add + RMSNorm, fused: the norm before every sub-block of a decoder-only embedder (Qwen2, Qwen3).

With a residual: s = x + residual, rounded to the dtype (the sum the model's residual stream keeps, written to
`sum_out` for the next layer), and out = s * rsqrt(mean(s²) + eps) * weight; without one, out = RMSNorm(x).

Numerics are transformers' Qwen3RMSNorm (Qwen2RMSNorm is the same): normalise in fp32, round to the input dtype,
THEN multiply by the weight (in the dtype: one more rounding), `weight * (s * rsqrt(mean(s²) + eps)).to(dtype)`.
That order, not the fp32 product rounded once (which torch's CPU F.rms_norm computes), because the embeddings are
held to transformers' and sentence-transformers' (tests/models/test_decoder.py); in fp32 the two are the same.

The CUDA kernel gives each row to one warp (8 rows a block, any hidden size): a pass sums the squares in fp32
(per lane, then across lanes by shuffles; every term is positive, so there is no cancellation to guard against),
a second pass re-reads the row and writes the output. Row r of x starts at (r / group) * x_stride + (r % group) *
hidden: a [rows, hidden] tensor with any row stride (group 1), or a [tokens, heads, head_dim] view with a token stride
(group = heads: Qwen3's per-head q/k norm on views of the QKV GEMM's output); residual, out and sum_out are contiguous.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kernels import cuda

CUDA_SOURCE = r"""
#define RMS_PARAMS const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual, \
    const scalar_t* __restrict__ weight, scalar_t* __restrict__ out, scalar_t* __restrict__ sum_out, \
    int rows, int hidden, int group, long long x_stride, float eps, int has_residual, int write_sum
// Where row `row` of x starts (see the module docstring).
__device__ __forceinline__ long long rms_x_offset(long long row, int group, long long x_stride, int hidden) {
    return (row / group) * x_stride + (row % group) * (long long)hidden;
}
// Element c of the row to normalise: x + residual rounded to scalar_t, as the model's residual stream holds it, or x.
__device__ __forceinline__ scalar_t rms_sum(const scalar_t* xr, const scalar_t* rr, int c, int has_residual) {
    return has_residual ? from_f(to_f(xr[c]) + to_f(rr[c])) : xr[c];
}
// transformers' order: normalised in fp32 and rounded to scalar_t, then times the weight, rounded again.
__device__ __forceinline__ scalar_t rms_out(scalar_t s, scalar_t w, float rstd) {
    return from_f(to_f(from_f(to_f(s) * rstd)) * to_f(w));
}
extern "C" __global__ void residual_rmsnorm(RMS_PARAMS)
{
    const int lane = threadIdx.x & 31;
    const long long row = warp_row();
    if (row >= rows) return;
    const scalar_t* xr = x + rms_x_offset(row, group, x_stride, hidden);
    const scalar_t* rr = residual + row * hidden;
    float squares = 0.f;
    for (int c = lane; c < hidden; c += 32) {
        const scalar_t s = rms_sum(xr, rr, c, has_residual);
        if (write_sum) sum_out[row * hidden + c] = s;
        const float v = to_f(s);
        squares += v * v;
    }
    const float rstd = rsqrtf(warp_sum(squares) / (float)hidden + eps);  // every lane the same bits (xor butterfly)
    scalar_t* o = out + row * hidden;
    for (int c = lane; c < hidden; c += 32) o[c] = rms_out(rms_sum(xr, rr, c, has_residual), weight[c], rstd);
}

// The same with 16-byte loads and stores (hidden a multiple of PACK_VEC, 16-byte aligned rows): a lane keeps up to
// RMS_KEEP packs of its row's sums in registers (as scalar_t: the sum is rounded to it anyway), so rows up to
// 32 * RMS_KEEP * PACK_VEC wide (2,048 in fp16/bf16, 1,024 in fp32) are read from memory once; wider rows re-read
// the rest (from L2, just read).
#define RMS_KEEP 8
__device__ __forceinline__ Pack rms_pack_sum(const Pack* xr, const Pack* rr, int p, int has_residual) {
    const Pack a = xr[p];
    if (!has_residual) return a;
    const Pack r = rr[p];
    Pack s;
    for (int j = 0; j < PACK_VEC; ++j) s.v[j] = from_f(to_f(a.v[j]) + to_f(r.v[j]));
    return s;
}
__device__ __forceinline__ float rms_pack_squares(const Pack s) {
    float t = 0.f;
    for (int j = 0; j < PACK_VEC; ++j) { const float v = to_f(s.v[j]); t += v * v; }
    return t;
}
__device__ __forceinline__ Pack rms_pack_out(const Pack s, const Pack w, float rstd) {
    Pack o;
    for (int j = 0; j < PACK_VEC; ++j) o.v[j] = rms_out(s.v[j], w.v[j], rstd);
    return o;
}
extern "C" __global__ void residual_rmsnorm_vec(RMS_PARAMS)
{
    const int lane = threadIdx.x & 31;
    const long long row = warp_row();
    if (row >= rows) return;
    const int packs = hidden / PACK_VEC;
    const Pack* xr = reinterpret_cast<const Pack*>(x + rms_x_offset(row, group, x_stride, hidden));
    const Pack* rr = reinterpret_cast<const Pack*>(residual + row * hidden);
    Pack* sr = reinterpret_cast<Pack*>(sum_out + row * hidden);
    Pack keep[RMS_KEEP];
    float squares = 0.f;
#pragma unroll
    for (int i = 0; i < RMS_KEEP; ++i) {
        const int p = lane + 32 * i;
        if (p < packs) {
            keep[i] = rms_pack_sum(xr, rr, p, has_residual);
            if (write_sum) sr[p] = keep[i];
            squares += rms_pack_squares(keep[i]);
        }
    }
    for (int p = lane + 32 * RMS_KEEP; p < packs; p += 32) {
        const Pack s = rms_pack_sum(xr, rr, p, has_residual);
        if (write_sum) sr[p] = s;
        squares += rms_pack_squares(s);
    }
    const float rstd = rsqrtf(warp_sum(squares) / (float)hidden + eps);
    const Pack* wp = reinterpret_cast<const Pack*>(weight);
    Pack* o = reinterpret_cast<Pack*>(out + row * hidden);
#pragma unroll
    for (int i = 0; i < RMS_KEEP; ++i) {
        const int p = lane + 32 * i;
        if (p < packs) o[p] = rms_pack_out(keep[i], wp[p], rstd);
    }
    for (int p = lane + 32 * RMS_KEEP; p < packs; p += 32)
        o[p] = rms_pack_out(rms_pack_sum(xr, rr, p, has_residual), wp[p], rstd);
}
"""
ROWS_PER_BLOCK = 8


def residual_rmsnorm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                               out: torch.Tensor | None = None, sum_out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm(x + residual) over the last dim in plain torch, transformers' Qwen3RMSNorm order (module docstring).

    x, residual: [..., hidden]; weight: [hidden]. The sum, in x's dtype, is copied to `sum_out` when given."""
    s = x if residual is None else x + residual  # rounded to the dtype, as the model's residual stream is
    if sum_out is not None:
        sum_out.copy_(s)
    v = s.float()
    result = weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return result if out is None else out.copy_(result)


def residual_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out: torch.Tensor | None = None, sum_out: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatcher: the fused CUDA kernel where `cuda.use_kernels(x)`, the reference otherwise. Returns out.

    x: [rows, hidden] (any row stride) or [tokens, heads, hidden] (heads adjacent, any token stride), last dim
    contiguous. residual: None, or x's shape, contiguous. weight: [hidden]. out, sum_out: optional contiguous tensors
    of x's shape, overlapping neither x nor residual; out is new when not given, sum_out (the rounded x + residual)
    is written only when given, and only with a residual.
    """
    if x.dim() not in (2, 3) or (residual is not None and residual.shape != x.shape):
        got = None if residual is None else tuple(residual.shape)
        raise ValueError(f"x {tuple(x.shape)} must be [rows, hidden] or [tokens, heads, hidden] and residual {got} the same")
    if sum_out is not None and residual is None:
        raise ValueError("sum_out is x + residual: pass a residual with it")
    if not cuda.use_kernels(x):
        return residual_rmsnorm_reference(x, residual, weight, eps, out, sum_out)
    hidden, shape = x.shape[-1], tuple(x.shape)
    rows = math.prod(shape[:-1])
    group = shape[1] if x.dim() == 3 else 1
    if x.dtype != weight.dtype or (x.stride(-1) != 1 and hidden > 1) or (group > 1 and x.stride(1) != hidden):
        raise ValueError(f"x must be a {weight.dtype} tensor with contiguous rows (heads adjacent); got {x.dtype} "
                         f"strides {x.stride()}")
    if rows >= 2 ** 31:
        raise ValueError(f"{rows} rows: at most 2**31 - 1")
    cuda.check_cuda_tensor(weight, "weight", x.dtype, (hidden,))
    extra = [] if residual is None else [residual]
    if residual is not None:
        cuda.check_cuda_tensor(residual, "residual", x.dtype, shape)
    if sum_out is not None:
        cuda.check_cuda_tensor(sum_out, "sum_out", x.dtype, shape)
        extra.append(sum_out)
    out = cuda.output(out, shape, x)
    if rows and hidden:
        # 16-byte packs when every row starts aligned (decoders' hidden and head sizes in every dtype), else scalars
        pack = 16 // x.element_size()
        vec = hidden % pack == 0 and x.stride(0) % pack == 0 and cuda.aligned(x, weight, out, *extra)
        cuda.launch(CUDA_SOURCE, "residual_rmsnorm_vec" if vec else "residual_rmsnorm", x.dtype,
                    ((rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK,), (32 * ROWS_PER_BLOCK,),
                    (x, x if residual is None else residual, weight, out, x if sum_out is None else sum_out, rows, hidden,
                     group, np.int64(x.stride(0)), float(eps), residual is not None, sum_out is not None))
    return out
