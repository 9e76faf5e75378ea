"""kernels/rmsnorm.py: the fused residual add + RMSNorm kernel against its plain-torch reference, as test_kernels.py
checks the others (on a GPU under the gpu marker, and on the CPU emulator for the shapes small enough for it), plus
transformers' rounding order, Qwen3's per-head q/k norm on strided views, and the entry checks."""

from __future__ import annotations

import pytest
import torch

from kernels import cuda, emulate
from kernels.rmsnorm import residual_rmsnorm, residual_rmsnorm_reference
from tests.kernels.test_kernels import BOUND, DTYPES, cases, poisoned, rel_err

# rows 1 to 65,537; hidden 1 to 4,100, odd ones and ones past what the packed kernel keeps in registers (2,048 in
# fp16/bf16, 1,024 in fp32)
SHAPES = [(1, 64), (7, 100), (2, 33), (3, 31), (5, 1), (33, 1000), (128, 1024), (9, 2560), (17, 4096), (3, 4100),
          (1500, 64), (512, 4096), (4096, 1024), (65536, 1024), (65537, 64)]


def launched(before) -> set[str]:
    """The emulated kernels launched since `before` (a copy of emulate.launches)."""
    return set(emulate.launches - before)


def inputs(rows: int, hidden: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(rows * 7919 + hidden)
    x, r = (torch.randn(rows, hidden, device=device, generator=g).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(hidden, device=device, generator=g)).to(dtype)  # as trained RMSNorm weights are
    return x, r, weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where,rows,hidden", cases(SHAPES, lambda r, h: r * h * 2))  # two launches a case
def test_residual_rmsnorm(kernel_device, where, dtype, rows, hidden):
    device = kernel_device
    x, r, weight = inputs(rows, hidden, dtype, device)
    out, total = poisoned((rows, hidden), dtype, device), poisoned((rows, hidden), dtype, device)
    before = emulate.launches.copy()
    got = residual_rmsnorm(x, r, weight, 1e-6, out=out, sum_out=total)
    want = residual_rmsnorm_reference(x.float(), r.float(), weight.float(), 1e-6)
    assert got.data_ptr() == out.data_ptr() and rel_err(got, want) <= BOUND[dtype]
    assert torch.equal(total, x + r)  # the residual stream's sum, rounded to the dtype as torch's add rounds it
    # without a residual, into a new tensor
    want = residual_rmsnorm_reference(x.float(), None, weight.float(), 1e-5)
    assert rel_err(residual_rmsnorm(x, None, weight, 1e-5), want) <= BOUND[dtype]
    if where == "emulated":  # 16-byte packs whenever the rows allow them
        packed = hidden % (16 // x.element_size()) == 0
        assert launched(before) == {"residual_rmsnorm_vec" if packed else "residual_rmsnorm"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", [pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
@pytest.mark.parametrize("hidden", [1024, 100])
def test_rounding_order_is_transformers(kernel_device, where, dtype, hidden):
    """Normalised in fp32, rounded to the dtype, then times the weight (Qwen3RMSNorm), not the fp32 product rounded
    once: the kernel's outputs are (all but the odd rounding tie away) those of the reference in the input dtype."""
    device = kernel_device
    x, r, weight = inputs(64, hidden, dtype, device)
    got = residual_rmsnorm(x, r, weight, 1e-6)
    hf = residual_rmsnorm_reference(x, r, weight, 1e-6)
    s = (x + r).float()
    fused = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.float()).to(dtype)
    same_hf, same_fused = (got == hf).float().mean().item(), (got == fused).float().mean().item()
    assert same_hf >= 0.99 and same_hf > same_fused + 0.05, (same_hf, same_fused)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", [pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(37, 4, 2, 32), (5, 16, 8, 128), (9, 3, 3, 36)])
def test_per_head_norm_on_views_of_the_qkv_output(kernel_device, where, dtype, tokens, heads, kv_heads, head_dim):
    """Qwen3's q/k norm: [tokens, heads, head_dim] views of the QKV GEMM's [tokens, (heads + 2 kv) * head_dim] output,
    read in place (a token stride), written contiguous; packed where the views' rows are aligned, scalar where not."""
    device = kernel_device
    g = torch.Generator(device=device).manual_seed(tokens * heads)
    width, q_width = (heads + 2 * kv_heads) * head_dim, heads * head_dim
    flat = torch.randn(tokens * width + 1, device=device, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(head_dim, device=device, generator=g)).to(dtype)
    for offset in (0, 1):  # aligned rows, then every row one element in
        qkv = flat[offset:offset + tokens * width].view(tokens, width)
        q = qkv[:, :q_width].view(tokens, heads, head_dim)
        k = qkv[:, q_width:q_width + kv_heads * head_dim].view(tokens, kv_heads, head_dim)
        for view in (q, k):
            before = emulate.launches.copy()
            got = residual_rmsnorm(view, None, weight, 1e-6, out=poisoned(tuple(view.shape), dtype, device))
            want = residual_rmsnorm_reference(view.float(), None, weight.float(), 1e-6)
            assert got.is_contiguous() and got.shape == view.shape and rel_err(got, want) <= BOUND[dtype]
            if where == "emulated":
                packed = offset == 0 and head_dim % (16 // flat.element_size()) == 0 and width % (16 // flat.element_size()) == 0
                assert launched(before) == {"residual_rmsnorm_vec" if packed else "residual_rmsnorm"}


def test_entry_checks():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="residual"):
        residual_rmsnorm(x, torch.randn(4, 32), torch.ones(64), 1e-6)
    with pytest.raises(ValueError, match="pass a residual"):
        residual_rmsnorm(x, None, torch.ones(64), 1e-6, sum_out=torch.empty(4, 64))
    with cuda.emulation():
        with pytest.raises(ValueError, match="contiguous rows"):
            residual_rmsnorm(torch.randn(64, 4).t(), None, torch.ones(64), 1e-6)
        with pytest.raises(ValueError, match="contiguous rows"):
            residual_rmsnorm(torch.randn(3, 64, 4).transpose(1, 2), None, torch.ones(64), 1e-6)
        with pytest.raises(ValueError, match="weight"):
            residual_rmsnorm(x, None, torch.ones(63), 1e-6)
        with pytest.raises(ValueError, match="out"):
            residual_rmsnorm(x, x.clone(), torch.ones(64), 1e-6, out=torch.empty(4, 64, dtype=torch.float16))
