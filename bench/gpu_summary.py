"""One table of a GPU session's results against the issues' GPU targets, read from the files the device run left.

    python3 bench/gpu_summary.py [OUT]          (OUT: the folder gpu_session.sh wrote, default bench/out)

Reads gpu_kernels.json (bench/gpu_kernels.py), device_cache_gpu.json (bench/device_cache_gpu.py),
embedding_cache.json (bench/embedding_cache.py --only dlrm), serve_load_<dtype>.json (bench/loadgen.py),
serve_check_<dtype>.txt (bench/gpu_serve_check.py) and parts.txt;
a missing file is a row that says so, never a stop: the table is printed whatever part ran out of time.
Standard library only (the device has no project dependencies beyond torch's).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def kernel_rows(kernels: dict | None) -> list[tuple[str, str, str]]:
    """Issue 4: LayerNorm and softmax at >= 4096x768 fp16: >= 90% of copy bandwidth and >= 1.3x torch."""
    if not kernels or "kernels" not in kernels:
        return [("kernels (issue 4)", "not run", "")]
    rows = []
    for r in kernels["kernels"].get("torch.float16", []):
        if r["op"] not in ("bias+residual+layernorm", "masked softmax"):
            continue
        of_copy = r.get("gpu_of_copy", r["of_copy"])  # the graphed figure: the kernel's own time, no launch cost
        speedup = r.get("gpu_speedup_vs_first_peer", r["speedup_vs_first_peer"])
        met = of_copy >= 0.9 and speedup >= 1.3
        rows.append((f"{r['op']} {r['shape']} fp16", f"{of_copy:.0%} of copy, {speedup:.2f}x torch",
                     "met" if met else "missed"))
    return rows


def encoder_rows(kernels: dict | None) -> list[tuple[str, str, str]]:
    """Issue 4: encoder on mixed lengths 8-512: >= 1.5x transformers eager fp16, >= 1.1x its torch.compile."""
    if not kernels or "encoders" not in kernels:
        return [("encoder vs eager / compile (issue 4)", "not run", "")]
    rows = []
    for r in kernels["encoders"]:
        compiled = r.get("vs_compiled")
        met = r["vs_eager"] >= 1.5 and (compiled is None or compiled >= 1.1)
        rows.append((f"encoder {r['encoder']} {r['tokens']} tokens",
                     f"{r['vs_eager']:.2f}x eager" + (f", {compiled:.2f}x compile" if compiled else ", compile not run"),
                     "met" if met and compiled else ("missed" if not met else "eager met")))
        for b in r.get("serving_batches", []):
            graphs = b.get("embed_graphs_ms")
            rows.append((f"  {b['sequences']} texts pooled to host", f"ours {b['embed_eager_ms']:.2f} ms, graphs "
                         + (f"{graphs:.2f} ms" if graphs else "n/a") + f", eager HF {b['hf_eager_to_host_ms']:.2f} ms", ""))
    return rows


def cache_rows(cache: dict | None) -> list[tuple[str, str, str]]:
    """Issue 6: 16k keys, dim 64, fully cached: >= 100 GB/s on an H100."""
    if not cache:
        return [("device cache 16k x 64 (issue 6)", "not run", "")]
    rows = []
    for c in cache.get("cells", []):
        if c["dim"] == 64 and c["batch"] == 16384 and c["path"] == "fused kernel":
            rows.append((f"device cache 16k keys dim 64 {c['policy']}",
                         f"{c['gbs']:.1f} GB/s each, {c['back_to_back_gbs']:.1f} back to back",
                         "met" if c["gbs"] >= 100 else "missed"))
    return rows or [("device cache 16k x 64 (issue 6)", "no such cell", "")]


def dlrm_rows(report: dict | None) -> list[tuple[str, str, str]]:
    """Issue 6: a DLRM request of 1,024 samples (26 sparse features) >= 5x the persistent tier alone, end to end."""
    if not report or not report.get("dlrm"):
        return [("DLRM end to end vs persistent only (issue 6, >= 5x)", "not run", "")]
    return [(f"DLRM end to end, device cache {d['cache_fraction']:.0%} on {d.get('device', '?')} (issue 6, >= 5x)",
             f"{d['ratio']:.2f}x ({d['server_ms_per_batch']:.1f} vs {d['persistent_ms_per_batch']:.1f} ms a batch; lookups "
             f"{d['lookup_ratio']:.2f}x; device hit rate {d['device_hit_rate_timed']:.2f})",
             "met" if d["ratio"] >= 5 else "missed") for d in report["dlrm"]]


def serve_rows(out: Path) -> list[tuple[str, str, str]]:
    """The server on the GPU: answers vs sentence-transformers fp32, throughput vs ST on the GPU, live cost error."""
    rows = []
    for check in sorted(out.glob("serve_check_*.txt")):
        found = re.findall(r"cosine to sentence-transformers float32 on CPU: min ([0-9.]+)", check.read_text())
        graphs = re.findall(r"cuda graphs: (.*)", check.read_text())
        rows.append((f"server {check.stem.removeprefix('serve_check_')} vs ST fp32 (cosine >= 0.999)",
                     (f"min {found[-1]}" if found else "no answer") + (f"; graphs {graphs[-1][:60]}" if graphs else ""),
                     ("met" if float(found[-1]) >= 0.999 else "missed") if found else "failed"))
    for load_file in sorted(out.glob("serve_load_*.json")):
        load = _load(load_file) or {}
        dtype = load_file.stem.removeprefix("serve_load_")
        ratio = load.get("throughput_ratio")
        rps = (load.get("load") or {}).get("requests_per_s")
        rows.append((f"server {dtype} vs ST on the GPU (req/s)", f"{ratio}x" + (f" ({rps:.0f} req/s)" if rps else ""), ""))
        error = load.get("cost_model_error_after_load") or {}
        if error.get("batches"):
            rows.append((f"cost model live error {dtype} (issue 3, median <= 10%)",
                         f"median {error['median_abs']:.1%} over {error['batches']} batches, bias {error['median_signed']:+.1%}",
                         "met" if error["median_abs"] <= 0.10 else "missed"))
    return rows or [("server on the GPU", "not run", "")]


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out")
    kernels = _load(out / "gpu_kernels.json")
    rows = [*kernel_rows(kernels), *encoder_rows(kernels), *cache_rows(_load(out / "device_cache_gpu.json")),
            *dlrm_rows(_load(out / "embedding_cache.json")), *serve_rows(out)]
    device = (kernels or {}).get("device", "?")
    print(f"\n== GPU session summary ({device}; {out})")
    width = max(len(r[0]) for r in rows)
    for name, value, verdict in rows:
        print(f"{name:<{width}}  {value:<60} {verdict}")
    parts = out / "parts.txt"
    if parts.exists():
        print("\n" + parts.read_text().rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
