"""GPU benchmark of the kernels and the encoder; one command, no network, nothing installed.

    PYTHONPATH=. python3 bench/gpu_kernels.py --out $OUT      # on the GPU machine
    .venv/bin/python bench/gpu_kernels.py --smoke              # tiny shapes on CPU: checks the script only

1. Device-to-device copy bandwidth (the ceiling of these memory-bound kernels).
2. Each kernel's achieved GB/s at BERT shapes vs that ceiling and vs torch's own ops.
3. Varlen attention: nested-tensor SDPA vs one SDPA call per sequence vs padded SDPA with a mask.
4. The encoder (all-MiniLM-L6-v2-sized and BERT-base-sized, seeded random weights from a config) on
   mixed lengths 8-512, fp16: ours (packed) vs transformers eager fp16 with SDPA (padded batches) vs
   torch.compile of it. Prints a table; writes gpu_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.activation import bias_activation  # noqa: E402
from kernels.attention import flash_eligible, varlen_attention_flash, varlen_attention_nested, varlen_attention_reference  # noqa: E402
from kernels.layernorm import bias_residual_layernorm  # noqa: E402
from kernels.qkv import split_qkv  # noqa: E402
from kernels.rmsnorm import residual_rmsnorm  # noqa: E402
from kernels.softmax import masked_softmax  # noqa: E402

ENCODERS = {
    "all-MiniLM-L6-v2 size": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base size": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def timer(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() after warm-up (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def graph_timer(fn, calls: int = 20, repeats: int = 20) -> float | None:
    """Seconds of GPU time per fn() with no host cost: `calls` calls captured in one CUDA graph, replayed. What a
    kernel's bandwidth is judged on (launch costs are the host's and are timed by `timer`); None if capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return timer(graph.replay, "cuda", repeats) / calls
    except Exception as exc:  # noqa: BLE001 - report, don't die
        print(f"graph capture failed: {str(exc)[:160]}")
        return None


def copy_bandwidth(device: str, mb: int, repeats: int) -> float:
    x = torch.empty(mb * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / timer(lambda: y.copy_(x), device, repeats) / 1e9


def kernel_rows(device: str, dtype, smoke: bool, repeats: int, copy_gbs: float) -> list[dict]:
    rows = []
    graphed = device == "cuda"
    esize = torch.tensor([], dtype=dtype).element_size()
    t = 64 if smoke else 4096
    shapes = [(t, 768)] if smoke else [(4096, 768), (16384, 768), (16384, 1024), (65536, 768)]
    for r, h in shapes:
        x, res = torch.randn(r, h, device=device, dtype=dtype), torch.randn(r, h, device=device, dtype=dtype)
        b, g, be = (torch.randn(h, device=device, dtype=dtype) for _ in range(3))
        fns = {"ours": lambda: bias_residual_layernorm(x, b, res, g, be, 1e-12),
               "torch add+add+layer_norm": lambda: F.layer_norm(x + b + res, (h,), g, be, 1e-12)}
        summed = x + b + res
        torch_ln = timer(lambda: F.layer_norm(summed, (h,), g, be, 1e-12), device, repeats)
        rows.append(_row("bias+residual+layernorm", f"{r}x{h}", 3 * r * h * esize, timer(fns["ours"], device, repeats),
                         {"torch add+add+layer_norm": timer(fns["torch add+add+layer_norm"], device, repeats),
                          "torch layer_norm alone": torch_ln}, copy_gbs, fns if graphed else None))
    for r, h in ([(64, 1024)] if smoke else [(4096, 1024), (16384, 1024), (16384, 4096)]):  # Qwen3-0.6B's, 8B's hidden
        x, res, w = torch.randn(r, h, device=device, dtype=dtype), torch.randn(r, h, device=device, dtype=dtype), \
            torch.randn(h, device=device, dtype=dtype)
        out, total = torch.empty_like(x), torch.empty_like(x)  # the decoder's use: the norm and the residual stream
        fns = {"ours": lambda: residual_rmsnorm(x, res, w, 1e-6, out=out, sum_out=total),
               "torch add+rms_norm": lambda: F.rms_norm(x + res, (h,), w, 1e-6)}
        rows.append(_row("residual+rmsnorm", f"{r}x{h}", 4 * r * h * esize, timer(fns["ours"], device, repeats),
                         {"torch add+rms_norm": timer(fns["torch add+rms_norm"], device, repeats)}, copy_gbs,
                         fns if graphed else None))
    soft = [(2, 12, 64, 64)] if smoke else [(1, 1, 4096, 768), (32, 12, 128, 128), (8, 12, 512, 512), (4, 16, 1024, 1024)]
    for shape in soft:
        s = torch.randn(*shape, device=device, dtype=dtype)
        mask = torch.rand(shape[0], shape[-1], device=device) > 0.1
        fns = {"ours": lambda: masked_softmax(s, mask, 0.125),
               "torch scale+mask+softmax": lambda: torch.softmax((s * 0.125).masked_fill(~mask[:, None, None, :], float("-inf")), -1),
               "torch softmax alone": lambda: torch.softmax(s, -1)}
        n = s.numel()
        rows.append(_row("masked softmax", "x".join(map(str, shape)), 2 * n * esize, timer(fns["ours"], device, repeats),
                         {k: timer(f, device, repeats) for k, f in fns.items() if k != "ours"}, copy_gbs, fns if graphed else None))
    for r, c in ([(64, 1536)] if smoke else [(16384, 1536), (16384, 3072)]):
        x, b = torch.randn(r, c, device=device, dtype=dtype), torch.randn(c, device=device, dtype=dtype)
        fns = {"ours": lambda: bias_activation(x, b, "gelu"), "torch add+gelu": lambda: F.gelu(x + b)}
        rows.append(_row("bias+gelu(erf)", f"{r}x{c}", 2 * r * c * esize, timer(fns["ours"], device, repeats),
                         {"torch add+gelu": timer(fns["torch add+gelu"], device, repeats)}, copy_gbs, fns if graphed else None))
    for r, h in ([(64, 768)] if smoke else [(16384, 768), (16384, 1024)]):
        qkv, b = torch.randn(r, 3 * h, device=device, dtype=dtype), torch.randn(3 * h, device=device, dtype=dtype)
        fns = {"ours": lambda: split_qkv(qkv, b, h // 64),  # BERT's head size, 64
               "torch add+transpose": lambda: (qkv + b).view(r, 3, h).transpose(0, 1).contiguous()}
        rows.append(_row("qkv split+bias", f"{r}x{3 * h}", 2 * r * 3 * h * esize, timer(fns["ours"], device, repeats),
                         {"torch add+transpose": timer(fns["torch add+transpose"], device, repeats)}, copy_gbs, fns if graphed else None))
    return rows


def _row(op, shape, nbytes, ours, peers, copy_gbs, graphed: dict | None = None) -> dict:
    """graphed: {"ours": fn, peer name: fn} timed again as GPU time alone (graph_timer), on a GPU."""
    gbs = nbytes / ours / 1e9
    row = {"op": op, "shape": shape, "ours_us": ours * 1e6, "ours_gbs": gbs, "of_copy": gbs / copy_gbs,
           **{f"{k}_us": v * 1e6 for k, v in peers.items()},
           "speedup_vs_first_peer": next(iter(peers.values())) / ours}
    if graphed:
        kernel_s = {name: graph_timer(fn) for name, fn in graphed.items()}
        row.update({f"{name}_gpu_us": (t * 1e6 if t else None) for name, t in kernel_s.items()})
        first_peer = next(iter(peers))
        if kernel_s.get("ours") and kernel_s.get(first_peer):
            row["ours_gpu_gbs"] = nbytes / kernel_s["ours"] / 1e9
            row["gpu_of_copy"] = row["ours_gpu_gbs"] / copy_gbs
            row["gpu_speedup_vs_first_peer"] = kernel_s[first_peer] / kernel_s["ours"]
    return row


def attention_rows(device: str, dtype, smoke: bool, repeats: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for label, lengths in ([("mixed 8-64 x4", [rng.randint(8, 64) for _ in range(4)])] if smoke else [
            ("mixed 8-512 x64", [rng.randint(8, 512) for _ in range(64)]),
            ("short 8-64 x256", [rng.randint(8, 64) for _ in range(256)]),
            ("long 512 x16", [512] * 16)]):
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        q, k, v = (torch.randn(cu[-1], 12, 64, device=device, dtype=dtype) for _ in range(3))
        row = {"attention": label, "tokens": cu[-1]}
        row["per_sequence_us"] = timer(lambda: varlen_attention_reference(q, k, v, cu), device, repeats) * 1e6
        try:
            row["nested_us"] = timer(lambda: varlen_attention_nested(q, k, v, cu), device, repeats) * 1e6
        except (RuntimeError, NotImplementedError) as exc:
            row["nested_error"] = str(exc)[:200]
        if flash_eligible(q):
            row["flash_varlen_us"] = timer(lambda: varlen_attention_flash(q, k, v, cu), device, repeats) * 1e6
        width = max(lengths)
        pad = torch.zeros(len(lengths), 12, width, 64, device=device, dtype=dtype)
        mask = torch.zeros(len(lengths), 1, 1, width, dtype=torch.bool, device=device)
        for i, n in enumerate(lengths):
            mask[i, ..., :n] = True
        row["padded_masked_us"] = timer(lambda: F.scaled_dot_product_attention(pad, pad, pad, attn_mask=mask), device, repeats) * 1e6
        out.append(row)
    return out


def encoder_rows(device: str, dtype, smoke: bool, repeats: int, compile_: bool, save=lambda rows: None) -> list[dict]:
    """Ours and transformers eager for every encoder first, then torch.compile of each (its compile is the slow,
    risky part: what was measured before it is saved through `save` as each row is done)."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()

    from models.config import EncoderConfig  # noqa: PLC0415
    from models.encoder import PackedBatch  # noqa: PLC0415
    from models.weights import load_encoder  # noqa: PLC0415

    rng = random.Random(1)
    lengths = [rng.randint(8, 64 if smoke else 512) for _ in range(16 if smoke else 256)]
    seqs = [[rng.randint(1000, 29000) for _ in range(n)] for n in lengths]
    tokens = sum(lengths)
    # The peer runs padded batches of 32 length-sorted sequences (as sentence-transformers does).
    order = sorted(range(len(seqs)), key=lambda i: lengths[i])
    chunks = []
    for s in range(0, len(order), 32):
        part = [seqs[i] for i in order[s:s + 32]]
        width = max(map(len, part))
        width = (width + 63) // 64 * 64  # buckets keep torch.compile from recompiling per width
        ids = torch.tensor([p + [0] * (width - len(p)) for p in part], device=device)
        am = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in part], device=device)
        chunks.append((ids, am))

    def run_hf(model):
        with torch.inference_mode():
            for ids, am in chunks:
                model(input_ids=ids, attention_mask=am)

    rows, peers = [], []
    for name, dims in (list(ENCODERS.items())[:1] if smoke else ENCODERS.items()):
        cfg = tf.BertConfig(vocab_size=30522, max_position_embeddings=512, attn_implementation="sdpa", **dims)
        torch.manual_seed(0)
        hf = tf.BertModel(cfg, add_pooling_layer=False).eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            ours = load_encoder(EncoderConfig.from_dict(cfg.to_dict()), [Path(tmp) / "model.safetensors"])
        ours = ours.to(device, dtype)
        hf = hf.to(device, dtype)
        batch = PackedBatch.from_ids(seqs, 0, device)

        def run_ours():
            with torch.inference_mode():
                ours(batch)

        row = {"encoder": name, "dtype": str(dtype), "sequences": len(seqs), "tokens": tokens}
        row["ours_s"] = timer(run_ours, device, repeats)
        row["hf_eager_sdpa_s"] = timer(lambda: run_hf(hf), device, repeats)
        row["ours_tokens_per_s"] = tokens / row["ours_s"]
        row["vs_eager"] = row["hf_eager_sdpa_s"] / row["ours_s"]
        row["serving_batches"] = serving_batches(ours, hf, device, repeats, rng)
        rows.append(row)
        peers.append(hf)
        save(rows)
    for row, hf in zip(rows, peers if compile_ else []):
        started = time.perf_counter()
        try:
            compiled = torch.compile(hf)
            row["hf_compiled_s"] = timer(lambda: run_hf(compiled), device, repeats)
            row["vs_compiled"] = row["hf_compiled_s"] / row["ours_s"]
        except Exception as exc:  # noqa: BLE001 - report, don't die
            row["hf_compiled_error"] = str(exc)[:200]
        row["compile_and_time_s"] = time.perf_counter() - started
        save(rows)
    return rows


def serving_batches(ours, hf, device: str, repeats: int, rng: random.Random) -> list[dict]:
    """Latency of one forward at serving sizes (1 short text, 8 and 32 texts of mixed lengths), ours packed vs
    transformers eager on one padded batch: where launch costs on the host, not the GPU, set the pace. Then what the
    server runs, pooled vectors on the host: ours kernel by kernel, ours replaying CUDA graphs (models/graphs.py),
    and transformers eager with its first tokens copied to the host."""
    from models.encoder import PackedBatch  # noqa: PLC0415
    from models.graphs import GraphedForward  # noqa: PLC0415
    from models.runtime import EncoderEmbedder  # noqa: PLC0415

    embedder = EncoderEmbedder(ours, "mean", 0, torch.device(device))
    started = time.perf_counter()
    if device == "cuda":
        graphs_on = embedder.capture_graphs(4096, 64)  # the server's defaults (model.cuda_graph_max_tokens, ...)
    else:  # --smoke: the buckets' padded forward without a graph (what a capture records)
        embedder.graphs = GraphedForward(ours, "mean", None, 0, embedder.token_types, 4096, 64, embedder.device, embedder._eager)
        graphs_on = True
    graphs = embedder.graphs
    print(f"CUDA graphs: {'on' if graphs_on else 'off: ' + str(graphs and graphs.stats.off_reason)}, "
          f"{time.perf_counter() - started:.2f} s to capture and check")
    out = []
    for n, lo, hi in ((1, 16, 16), (8, 32, 96), (32, 32, 160)):
        seqs = [[rng.randint(1000, 29000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
        batch = PackedBatch.from_ids(seqs, 0, device)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        am = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        with torch.inference_mode():
            ours_s = timer(lambda: ours(batch), device, repeats * 4)
            hf_s = timer(lambda: hf(input_ids=ids, attention_mask=am), device, repeats * 4)
            hf_host_s = timer(lambda: hf(input_ids=ids, attention_mask=am).last_hidden_state[:, 0].cpu(), device, repeats * 4)
        row = {"sequences": n, "tokens": sum(map(len, seqs)), "ours_ms": ours_s * 1e3, "hf_eager_ms": hf_s * 1e3,
               "vs_eager": hf_s / ours_s, "hf_eager_to_host_ms": hf_host_s * 1e3}
        row["embed_eager_ms"] = 1e3 * timer(lambda: embedder._eager(seqs, None), device, repeats * 4)
        if graphs_on:
            before = graphs.stats.replays
            row["embed_graphs_ms"] = 1e3 * timer(lambda: embedder.embed(seqs), device, repeats * 4)
            row["graph_replays"] = graphs.stats.replays - before
            row["graphs_vs_eager_embed"] = row["embed_eager_ms"] / row["embed_graphs_ms"]
            row["graphs_vs_hf_to_host"] = row["hf_eager_to_host_ms"] / row["embed_graphs_ms"]
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script, measures nothing)")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke to check the script on CPU")
        return 2
    repeats = 2 if args.smoke else args.repeats
    dtype = torch.float32 if args.smoke else torch.float16
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)", "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section, so that a run cut short by its time limit leaves what it measured
        (out / "gpu_kernels.json").write_text(json.dumps(report, indent=1))

    report["copy_gbs"] = copy_bandwidth(device, 8 if args.smoke else 1024, repeats)
    print(f"{report['device']}: device-to-device copy {report['copy_gbs']:.0f} GB/s")
    report["kernels"] = {}
    for dt in ([dtype] if args.smoke else [torch.float16, torch.bfloat16]):
        report["kernels"][str(dt)] = rows = kernel_rows(device, dt, args.smoke, repeats, report["copy_gbs"])
        print(f"\n{'op':26} {'shape':18} {dt!s:>15} {'GB/s':>7} {'of copy':>8} {'vs torch':>9} | GPU time alone (graphed):"
              f" {'us':>8} {'GB/s':>7} {'of copy':>8} {'vs torch':>9}")
        for r in rows:
            gpu = (f" {r['ours_gpu_us']:8.1f} {r['ours_gpu_gbs']:7.0f} {r['gpu_of_copy']:8.0%} {r['gpu_speedup_vs_first_peer']:8.2f}x"
                   if r.get("ours_gpu_gbs") else "")
            print(f"{r['op']:26} {r['shape']:18} {r['ours_us']:12.1f} us {r['ours_gbs']:7.0f} {r['of_copy']:8.0%} "
                  f"{r['speedup_vs_first_peer']:8.2f}x |{' ' * 26}{gpu}")
        save()
    report["attention"] = attention_rows(device, dtype, args.smoke, repeats)
    save()
    print()
    for r in report["attention"]:
        print(f"attention {r['attention']:18} per-seq {r['per_sequence_us']:9.0f} us  nested "
              f"{r.get('nested_us', float('nan')):9.0f} us  flash varlen {r.get('flash_varlen_us', float('nan')):9.0f} us  "
              f"padded+mask {r['padded_masked_us']:9.0f} us")
    def save_encoders(rows: list[dict]) -> None:
        report["encoders"] = rows
        save()

    report["encoders"] = encoder_rows(device, dtype, args.smoke, max(3, repeats // 4), not args.no_compile and not args.smoke,
                                      save_encoders)
    print()
    for r in report["encoders"]:
        print(f"encoder {r['encoder']:22} {r['tokens']} tokens: ours {r['ours_s'] * 1e3:8.2f} ms "
              f"({r['ours_tokens_per_s']:,.0f} tok/s), {r['vs_eager']:.2f}x eager"
              + (f", {r['vs_compiled']:.2f}x torch.compile" if "vs_compiled" in r else ""))
        for b in r.get("serving_batches", []):
            print(f"    {b['sequences']:3d} sequences, {b['tokens']:5d} tokens: ours {b['ours_ms']:7.2f} ms, "
                  f"eager {b['hf_eager_ms']:7.2f} ms ({b['vs_eager']:.2f}x); pooled to host: ours "
                  f"{b['embed_eager_ms']:7.2f} ms, graphs {b.get('embed_graphs_ms', float('nan')):7.2f} ms "
                  f"({b.get('graphs_vs_eager_embed', float('nan')):.2f}x), eager {b['hf_eager_to_host_ms']:7.2f} ms "
                  f"({b.get('graphs_vs_hf_to_host', float('nan')):.2f}x)")
    save()
    print(f"\nwrote {out / 'gpu_kernels.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
