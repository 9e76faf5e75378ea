"""Masked, scaled softmax over the last dim of padded attention scores (any length).

probs = softmax(scores * scale with masked keys at -inf); a row whose keys are all masked gives zeros,
not NaN. The CUDA kernel gives each row to one warp: one pass keeps a running max and a rescaled sum
(online softmax, fp32), lanes merge by shuffles, a second pass writes exp(v - max) / sum.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels import cuda

CUDA_SOURCE = r"""
// Merges the lanes' running (max, rescaled sum) pairs; every lane ends with lane 0's bits.
__device__ __forceinline__ void online_softmax_warp_merge(float& m, float& z) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        float mb = __shfl_xor_sync(0xffffffffu, m, offset);
        float zb = __shfl_xor_sync(0xffffffffu, z, offset);
        float m_new = fmaxf(m, mb);
        if (m_new == -INFINITY) continue;  // both halves empty so far
        z = (m == -INFINITY ? 0.f : z * __expf(m - m_new)) + (mb == -INFINITY ? 0.f : zb * __expf(mb - m_new));
        m = m_new;
    }
    m = __shfl_sync(0xffffffffu, m, 0);
    z = __shfl_sync(0xffffffffu, z, 0);
}
#define SM_PARAMS const scalar_t* __restrict__ scores, const unsigned char* __restrict__ key_mask, scalar_t* __restrict__ out, \
    long long rows, int length, int rows_per_batch, float scale, int has_mask
extern "C" __global__ void masked_softmax(SM_PARAMS)
{
    const int lane = threadIdx.x & 31;
    const long long row = warp_row();
    if (row >= rows) return;
    const scalar_t* s = scores + row * length;
    const unsigned char* keep = has_mask ? key_mask + (row / rows_per_batch) * length : 0;
    float m = -INFINITY, z = 0.f;
    for (int c = lane; c < length; c += 32) {
        if (has_mask && !keep[c]) continue;
        float v = to_f(s[c]) * scale;
        float m_new = fmaxf(m, v);
        z = z * __expf(m - m_new) + __expf(v - m_new);
        m = m_new;
    }
    online_softmax_warp_merge(m, z);
    const float inv = (m == -INFINITY) ? 0.f : 1.f / z;
    scalar_t* o = out + row * length;
    for (int c = lane; c < length; c += 32) {
        bool masked = has_mask && !keep[c];
        o[c] = from_f(masked || m == -INFINITY ? 0.f : __expf(to_f(s[c]) * scale - m) * inv);
    }
}

// The same with 16-byte loads and stores (length a multiple of PACK_VEC, 16-byte aligned rows): a lane holds up
// to SM_KEEP packs of scaled scores in registers, so rows up to 32 * SM_KEEP * PACK_VEC long (1,024 in
// fp16/bf16) are read once; longer rows re-read the rest. Masked keys become -inf, whose exp is 0.
#define SM_KEEP 4
__device__ __forceinline__ void sm_pack_scores(const Pack a, const unsigned char* keep, int c0, float scale, float* v) {
    for (int j = 0; j < PACK_VEC; ++j) v[j] = (keep && !keep[c0 + j]) ? -INFINITY : to_f(a.v[j]) * scale;
}
__device__ __forceinline__ void sm_pack_merge(const float* v, float& m, float& z) {
    float pm = -INFINITY;
    for (int j = 0; j < PACK_VEC; ++j) pm = fmaxf(pm, v[j]);
    if (pm == -INFINITY) return;  // every key of the pack masked
    const float m_new = fmaxf(m, pm);
    float acc = 0.f;
    for (int j = 0; j < PACK_VEC; ++j) acc += __expf(v[j] - m_new);
    z = (m == -INFINITY ? 0.f : z * __expf(m - m_new)) + acc;
    m = m_new;
}
__device__ __forceinline__ Pack sm_pack_probs(const float* v, float m, float inv) {
    Pack o;
    for (int j = 0; j < PACK_VEC; ++j) o.v[j] = from_f(m == -INFINITY || v[j] == -INFINITY ? 0.f : __expf(v[j] - m) * inv);
    return o;
}
extern "C" __global__ void masked_softmax_vec(SM_PARAMS)
{
    const int lane = threadIdx.x & 31;
    const long long row = warp_row();
    if (row >= rows) return;
    const int packs = length / PACK_VEC;
    const Pack* s = reinterpret_cast<const Pack*>(scores + row * length);
    const unsigned char* keep = has_mask ? key_mask + (row / rows_per_batch) * length : 0;
    float kept[SM_KEEP][PACK_VEC];
    float m = -INFINITY, z = 0.f;
#pragma unroll
    for (int i = 0; i < SM_KEEP; ++i) {
        const int p = lane + 32 * i;
        if (p < packs) {
            sm_pack_scores(s[p], keep, p * PACK_VEC, scale, kept[i]);
            sm_pack_merge(kept[i], m, z);
        }
    }
    for (int p = lane + 32 * SM_KEEP; p < packs; p += 32) {
        float v[PACK_VEC];
        sm_pack_scores(s[p], keep, p * PACK_VEC, scale, v);
        sm_pack_merge(v, m, z);
    }
    online_softmax_warp_merge(m, z);
    const float inv = (m == -INFINITY) ? 0.f : 1.f / z;
    Pack* o = reinterpret_cast<Pack*>(out + row * length);
#pragma unroll
    for (int i = 0; i < SM_KEEP; ++i) {
        const int p = lane + 32 * i;
        if (p < packs) o[p] = sm_pack_probs(kept[i], m, inv);
    }
    for (int p = lane + 32 * SM_KEEP; p < packs; p += 32) {
        float v[PACK_VEC];
        sm_pack_scores(s[p], keep, p * PACK_VEC, scale, v);
        o[p] = sm_pack_probs(v, m, inv);
    }
}
"""
ROWS_PER_BLOCK = 8


def masked_softmax_reference(scores: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """scores: [batch, heads, queries, keys]; key_mask: [batch, keys] bool (True = keep) or None."""
    x = scores.float() * scale
    if key_mask is not None:
        x = x.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(x, dim=-1).nan_to_num(0.0)  # all-masked rows: zeros
    return probs.to(scores.dtype) if out is None else out.copy_(probs)


def masked_softmax(scores: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatcher: the CUDA kernel for CUDA tensors, the reference otherwise. out: optional tensor shaped like
    scores to write (not scores itself); a new one otherwise."""
    if scores.dim() != 4:
        raise ValueError(f"scores must be [batch, heads, queries, keys]; got {tuple(scores.shape)}")
    batch, heads, queries, keys = scores.shape
    if key_mask is not None and (key_mask.shape != (batch, keys) or key_mask.dtype != torch.bool):
        raise ValueError(f"key_mask must be bool [{batch}, {keys}]; got {key_mask.dtype} {tuple(key_mask.shape)}")
    if not cuda.use_kernels(scores):
        return masked_softmax_reference(scores, key_mask, scale, out)
    cuda.check_cuda_tensor(scores, "scores", scores.dtype)
    if key_mask is not None:
        cuda.check_cuda_tensor(key_mask, "key_mask", torch.bool)
    out = cuda.output(out, tuple(scores.shape), scores)
    rows = batch * heads * queries
    if rows and keys:
        vec = keys % (16 // scores.element_size()) == 0 and cuda.aligned(scores, out)  # 16-byte packs, else scalar loads
        cuda.launch(CUDA_SOURCE, "masked_softmax_vec" if vec else "masked_softmax", scores.dtype, ((rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK,),
                    (32 * ROWS_PER_BLOCK,), (scores, key_mask if key_mask is not None else scores, out,
                                             np.int64(rows), keys, heads * queries, float(scale),
                                             key_mask is not None))
    return out
