"""kernels/emulate.py: the CPU emulator gives the warp intrinsics' hardware results and refuses what the
hardware leaves undefined, so that the emulated kernel tests (test_kernels.py) mean something."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import cuda, emulate
from kernels.cache_lookup import agrees, cache_lookup

pytestmark = pytest.mark.skipif(emulate.compiler() is None, reason="no C++ compiler")

INTRINSICS = r"""
extern "C" __global__ void intrinsics(const float* x, float* sum, float* partner, float* from5, unsigned int* ballot,
                                      int* first, int n)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = threadIdx.x & 31;
    if (t >= n) return;  // never, for these launches: whole warps only
    float v = x[t];
    sum[t] = warp_sum(v);
    partner[t] = __shfl_xor_sync(0xffffffffu, v, 1);
    from5[t] = __shfl_sync(0xffffffffu, v, 5);
    const unsigned int b = __ballot_sync(0xffffffffu, (t % 3) == 0);
    ballot[t] = b;
    first[t] = __ffs(b);
    if (lane < 16) partner[t] += __shfl_xor_sync(0x0000ffffu, v, 2);  // a half-warp shuffle, named by its mask
}
"""


def ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def run(source: str, name: str, grid, block, args) -> None:
    emulate.launch(cuda.full_source_emulated(source, torch.float32), name, grid, block, args)


def test_warp_intrinsics_give_the_hardware_results():
    n = 128  # two blocks of two warps
    x = torch.arange(n, dtype=torch.float32) * 0.5 + 1
    outs = [torch.full((n,), float("nan")) for _ in range(3)]
    ballot = torch.zeros(n, dtype=torch.int32)
    first = torch.zeros(n, dtype=torch.int32)
    run(INTRINSICS, "intrinsics", (2,), (64,), [ptr(x), *map(ptr, outs), ptr(ballot), ptr(first), np.int32(n)])
    sum_, partner, from5 = outs
    t = np.arange(n)
    lane, warp = t % 32, t // 32
    xs = x.numpy()
    assert np.array_equal(sum_.numpy(), np.repeat(xs.reshape(-1, 32).sum(1), 32))
    want_partner = xs[t ^ 1] + np.where(lane < 16, xs[(warp * 32) + (lane ^ 2)], 0)
    assert np.array_equal(partner.numpy(), want_partner)
    assert np.array_equal(from5.numpy(), xs[warp * 32 + 5])
    want_ballot = np.array([sum(1 << i for i in range(32) if (w * 32 + i) % 3 == 0) for w in warp], dtype=np.uint64)
    assert np.array_equal(ballot.numpy().view(np.uint32).astype(np.uint64), want_ballot)
    assert np.array_equal(first.numpy(), [((int(b) & -int(b)).bit_length()) for b in want_ballot])


@pytest.mark.parametrize("body,message", [
    # lanes 16..31 have returned when the others shuffle with a full mask
    ("if (lane >= 16) return; v = __shfl_xor_sync(0xffffffffu, v, 1);", "has returned"),
    # the two halves reach different shuffles
    ("if (lane & 1) {\n v = __shfl_xor_sync(0xffffffffu, v, 1);\n} else {\n v = __shfl_xor_sync(0xffffffffu, v, 2);\n}",
     "divergent"),
    # a lane calls a shuffle whose mask leaves it out
    ("v = __shfl_xor_sync(lane < 16 ? 0x0000ffffu : 0xffffffffu, v, 1);", "disagree on the mask"),
    ("if (lane < 8) v = __shfl_xor_sync(0x0000ffffu, v, 1);", "has returned"),
])
def test_undefined_warp_intrinsic_uses_are_refused(body, message):
    source = ('extern "C" __global__ void bad(float* x) {\n const int lane = threadIdx.x & 31;\n float v = x[lane];\n'
              f"{body}\n x[lane] = v;\n}}\n")
    x = torch.zeros(32)
    with pytest.raises(emulate.EmulationError, match=message):
        run(source, "bad", (1,), (32,), [ptr(x)])


def test_a_full_mask_in_a_partial_warp_is_refused():
    source = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] = warp_sum(x[threadIdx.x]); }'
    whole, x = torch.ones(64), torch.ones(48)
    run(source, "k", (1,), (64,), [ptr(whole)])  # whole warps: fine
    assert whole.eq(32).all()
    with pytest.raises(emulate.EmulationError, match="lane 16 .* does not exist"):
        run(source, "k", (1,), (48,), [ptr(x)])


def test_launch_arguments_are_checked_like_kernel_params():
    source = 'extern "C" __global__ void k(float* x, long long n, float s) { if (threadIdx.x < n) x[threadIdx.x] *= s; }'
    x = torch.ones(32)
    run(source, "k", (1,), (32,), [ptr(x), np.int64(20), np.float32(3)])
    assert x[:20].eq(3).all() and x[20:].eq(1).all()
    with pytest.raises(emulate.EmulationError, match="argument 1 is 4 bytes; the kernel's parameter is 8"):
        run(source, "k", (1,), (32,), [ptr(x), np.int32(20), np.float32(3)])  # a Python int where the kernel takes long long
    with pytest.raises(emulate.EmulationError, match="takes 3 arguments; the launch passed 2"):
        run(source, "k", (1,), (32,), [ptr(x), np.int64(20)])
    with pytest.raises(emulate.EmulationError, match="no kernel named"):
        run(source, "other", (1,), (32,), [ptr(x)])


def test_launch_passes_every_width_through_its_param_block():
    """kernels.cuda.launch's parameter block (what cuLaunchKernel reads on a GPU) carries each argument at its width:
    the start-up probe kernel echoes a pointer's target, an int, a long long, a float, a bool and an unsigned
    long long, run here by the emulator from the same block; a second launch of the same signature refills it."""
    for value in (123456789, -42):
        inp, out = torch.tensor([value], dtype=torch.int64), torch.zeros(6, dtype=torch.int64)
        with cuda.emulation():
            cuda.launch(cuda.PROBE_SOURCE, "launch_probe", torch.float32, (1,), (32,),
                        (inp, 7, np.int64(-3 << 40), 2.5, True, np.uint64((1 << 63) + 5), out))
        assert out.tolist() == [value, 7, -3 << 40, 10, 1, (1 << 63) + 5 - (1 << 64)]
    with pytest.raises(emulate.EmulationError, match="argument 2 is 4 bytes; the kernel's parameter is 8"), cuda.emulation():
        cuda.launch(cuda.PROBE_SOURCE, "launch_probe", torch.float32, (1,), (32,),
                    (inp, 7, -3, 2.5, True, np.uint64(5), out))  # a Python int where the kernel takes long long
    with pytest.raises(TypeError, match="a kernel argument of type str"), cuda.emulation():
        cuda.launch(cuda.PROBE_SOURCE, "launch_probe", torch.float32, (1,), (32,), (inp, "7"))


def test_cupy_has_what_the_direct_launch_uses():
    """The names kernels.cuda's direct launch takes from CuPy (no device here to call them): a RawModule's kernel
    (a RawKernel) has `.kernel`, the compiled Function, whose `.ptr` is the CUfunction, and the driver binding has
    launchKernel with cuLaunchKernel's eleven arguments."""
    import inspect  # noqa: PLC0415

    import cupy  # noqa: PLC0415

    assert "RawKernel" in (cupy.RawModule.get_function.__doc__ or "")
    assert inspect.getattr_static(cupy.RawKernel, "kernel", None) is not None
    assert inspect.getattr_static(cupy.cuda.function.Function, "ptr", None) is not None
    doc = cuda._driver().launchKernel.__doc__ or ""
    assert doc.startswith("launchKernel(intptr_t f, unsigned int grid_dim_x") and "kernel_params, intptr_t extra)" in doc


def test_param_blocks_hand_cupys_launcher_the_same_values():
    args = (torch.zeros(3), 7, np.int64(-5), 2.5, False, np.uint64(9), torch.nn.Parameter(torch.zeros(1)), np.float32(0.25))
    block = cuda.ParamBlock(tuple(map(type, args)))
    block.fill(args)
    assert block.sizes == [8, 4, 8, 4, 4, 8, 8, 4]
    got = block.numpy()
    assert [type(v) for v in got] == [np.uint64, np.int32, np.int64, np.float32, np.int32, np.uint64, np.uint64, np.float32]
    assert [int(v) if i != 3 else float(v) for i, v in enumerate(got[:6])] == [args[0].data_ptr(), 7, -5, 2.5, 0, 9]


def test_a_kernel_that_does_not_build_reports_the_compiler():
    with pytest.raises(emulate.EmulationError, match="could not build"):
        run('extern "C" __global__ void k(float* x) { x[0] = undeclared; }', "k", (1,), (1,), [np.uint64(0)])


def test_cpu_tensors_take_the_kernel_path_only_under_emulation():
    x = torch.ones(2, 3)
    assert not cuda.use_kernels(x)
    with cuda.emulation():
        assert cuda.use_kernels(x)
        with cuda.emulation(False):
            assert not cuda.use_kernels(x)
        cuda.check_cuda_tensor(x, "x", torch.float32, (2, 3))
    with pytest.raises(ValueError, match="contiguous CUDA"):
        cuda.check_cuda_tensor(x, "x", torch.float32)


def test_the_cache_lookup_kernel_agrees_with_its_reference():
    """kernels/cache_lookup.py's own self-check (40 ways: two ballot rounds; widths 3 and 64: scalar and float4
    copies; a single-set table's empty marker), with the kernel run by the emulator."""
    with cuda.emulation():
        assert agrees("cpu", cache_lookup)


# -- random shapes: every kernel against its reference on the emulator (Hypothesis picks the shapes) ---------
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BOUND = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
ODD = st.integers(1, 200)


def worst(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "a slot of the output was never written"
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-6)).item()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), hidden=ODD, dtype=st.sampled_from(DTYPES), bias=st.booleans(),
       eps=st.sampled_from([1e-12, 1e-5]), offset=st.sampled_from([0.0, 30.0]), seed=st.integers(0, 2**31))
def test_layernorm_on_random_shapes(rows, hidden, dtype, bias, eps, offset, seed):
    from kernels.layernorm import bias_residual_layernorm, bias_residual_layernorm_reference  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    x, r = ((torch.randn(rows, hidden, generator=g) + offset).to(dtype) for _ in range(2))  # an offset tests Welford
    b, gamma, beta = (torch.randn(hidden, generator=g).to(dtype) for _ in range(3))
    with cuda.emulation():
        got = bias_residual_layernorm(x, b if bias else None, r, gamma, beta, eps, out=torch.full_like(x, float("nan")))
    want = bias_residual_layernorm_reference(x.double(), b.double() if bias else None, r.double(), gamma.double(),
                                             beta.double(), eps)
    assert worst(got, want) <= BOUND[dtype]


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), ODD), dtype=st.sampled_from(DTYPES),
       keep=st.floats(0.0, 1.0), scale=st.sampled_from([0.125, 1.0, 3.0]), masked=st.booleans(), seed=st.integers(0, 2**31))
def test_masked_softmax_on_random_shapes(shape, dtype, keep, scale, masked, seed):
    from kernels.softmax import masked_softmax, masked_softmax_reference  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(*shape, generator=g) * 4).to(dtype)
    mask = (torch.rand(shape[0], shape[-1], generator=g) < keep) if masked else None  # keep=0: all-masked rows
    with cuda.emulation():
        got = masked_softmax(scores, mask, scale, out=torch.full_like(scores, float("nan")))
    want = masked_softmax_reference(scores.double(), mask, scale)
    assert torch.isfinite(got).all() and (got.double() - want).abs().max().item() <= BOUND[dtype]


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 30), cols=ODD, dtype=st.sampled_from(DTYPES), bias=st.booleans(),
       kind=st.sampled_from(["gelu", "gelu_new", "relu", "silu"]), seed=st.integers(0, 2**31))
def test_bias_activation_on_random_shapes(rows, cols, dtype, bias, kind, seed):
    from kernels.activation import bias_activation, bias_activation_reference  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    x, b = torch.randn(rows, cols, generator=g).to(dtype), torch.randn(cols, generator=g).to(dtype)
    with cuda.emulation():
        got = bias_activation(x, b if bias else None, kind, out=torch.full_like(x, float("nan")))
    assert worst(got, bias_activation_reference(x.double(), b.double() if bias else None, kind)) <= BOUND[dtype]


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 50), heads=st.integers(1, 4), head_dim=st.integers(1, 40), dtype=st.sampled_from(DTYPES),
       bias=st.booleans(), seed=st.integers(0, 2**31))
def test_split_qkv_on_random_shapes(tokens, heads, head_dim, dtype, bias, seed):
    from kernels.qkv import split_qkv, split_qkv_reference  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    hidden = heads * head_dim
    qkv, b = torch.randn(tokens, 3 * hidden, generator=g).to(dtype), torch.randn(3 * hidden, generator=g).to(dtype)
    with cuda.emulation():
        got = split_qkv(qkv, b if bias else None, heads, out=torch.full((3, tokens, hidden), float("nan"), dtype=dtype))
    want = split_qkv_reference(qkv.double(), b.double() if bias else None, heads)
    for x, y in zip(got, want):
        assert x.is_contiguous() and worst(x, y) <= BOUND[dtype]


@pytest.mark.parametrize("hidden", [2, 8])
def test_layernorm_keeps_a_small_spread_under_a_large_offset(hidden):
    """Rows near 60 (x and residual near 30 each) with spreads down to about eps: an fp32 mean or sum of that size
    would round the spread away (4e-5 off, found by Hypothesis; torch's own fp32 layer_norm is as far off on some).
    Shifted by each input's first element, the kernel stays within 1e-5 of the exact result."""
    from kernels.layernorm import bias_residual_layernorm, bias_residual_layernorm_reference  # noqa: PLC0415

    g = torch.Generator().manual_seed(hidden)
    x, r = ((torch.randn(64, hidden, generator=g) * 0.05 + 30.0) for _ in range(2))
    b, gamma, beta = (torch.randn(hidden, generator=g) for _ in range(3))
    with cuda.emulation():
        got = bias_residual_layernorm(x, b, r, gamma, beta, 1e-5)
    want = bias_residual_layernorm_reference(x.double(), b.double(), r.double(), gamma.double(), beta.double(), 1e-5)
    assert worst(got, want) <= 1e-5
