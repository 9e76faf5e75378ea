"""The compact tables bench/embedding_cache.py prints at the end."""

from __future__ import annotations


def format_report(results: dict) -> str:
    """The compact tables printed at the end."""
    lines = []
    hr = results.get("hit_rates")
    if hr:
        h = hr["setup"]
        lfu = any("lfu_ref" in c for c in hr["cells"])
        lines.append(f"Hit rate on the measured half ({h['rows']:,} rows, batches of {h['batch']} keys, "
                     f"{h['batches']} batches, {h['ways']}-way device cache)")
        lines.append(f"{'keys':8} {'cache':>5} {'dev LRU':>8} {'dev LFU':>8} {'dev TLFU':>8} {'LRU ref':>8}"
                     + (f" {'LFU ref':>8}" if lfu else "") + f" {'static':>8} {'LFU∞':>8} {'oracle':>8} {'Belady':>8} {'bypass':>8} {'LRU/B':>6} {'LFU/B':>6} {'TLFU/B':>6} "
                     f"{'LFU∞/B':>7} {'oracle/B':>8}")
        for c in hr["cells"]:
            lines.append(f"{c['distribution']:8} {c['fraction']:5.0%} {c['device_lru']:8.4f} {c['device_lfu']:8.4f} "
                         f"{c['device_tinylfu']:8.4f} {c['lru_ref']:8.4f}" + (f" {c['lfu_ref']:8.4f}" if lfu else "")
                         + f" {c.get('static_frequency', float('nan')):8.4f} {c.get('ideal_lfu', float('nan')):8.4f} "
                         f"{c.get('static_oracle', float('nan')):8.4f} "
                         f"{c['belady']:8.4f} {c['belady_bypass']:8.4f} {c['device_lru_vs_belady']:6.1%} "
                         f"{c['device_lfu_vs_belady']:6.1%} {c['device_tinylfu_vs_belady']:6.1%} "
                         f"{c.get('ideal_lfu', float('nan')) / c['belady'] if c['belady'] else 1.0:7.1%} "
                         f"{c.get('static_oracle', float('nan')) / c['belady'] if c['belady'] else 1.0:8.1%}")
        t = hr["target"]
        lines.append(f"target best device policy >= 95% of Belady at α 1.05-1.2: worst {t['worst']:.1%} -> "
                     f"{'met' if t['met'] else 'MISSED'}")
    tp = results.get("throughput")
    if tp:
        lines.append("")
        lines.append(f"Lookup throughput ({tp[0]['keys_per_batch']:,} keys a batch, dim {tp[0]['dim']}, all held, "
                     f"{tp[0]['rows']:,} rows stored)")
        lines.append(f"{'tier':24} {'M keys/s':>9} {'GB/s':>7} {'ms/batch':>9} {'vs RocksDB':>10} {'others CPU':>10}")
        for r in tp:
            lines.append(f"{r['tier']:24} {r['keys_per_s'] / 1e6:9.3f} {r['GB_per_s']:7.3f} {r['ms_per_batch']:9.2f} "
                         f"{r['vs_persistent']:9.1f}x {r['phase']['other_share']!s:>10}")
    calls = results.get("calls")
    if calls:
        lines.append("")
        lines.append("One call (new random keys; device cache: 100 keys, by cache size)")
        lines.append(f"{'tier':14} {'slots':>9} {'keys':>6} {'lookup ms':>9} {'insert ms':>9}")
        for c in calls:
            grouped = (f"  (one call a table: lookup {c['per_table_lookup_ms']:.3f}, insert {c['per_table_insert_ms']:.3f})"
                       if "per_table_lookup_ms" in c else "")
            lines.append(f"{c['tier']:14} {c['slots'] or '':>9} {c['keys']:6} {c['lookup_ms']:9.3f} {c['insert_ms']:9.3f}{grouped}")
    for d in results.get("dlrm", []):
        lines.append("")
        lines.append(f"DLRM end to end (batch {d['batch']}, 26 tables, {d['rows']:,} rows dim {d['dim']}, α {d['alpha']}, "
                     f"device cache {d['cache_fraction']:.0%} {d.get('policy', 'lru')}, warm, on {d.get('device_name', 'cpu')}"
                     + (f"; volatile tier preloaded with {d['preloaded_rows']:,} rows" if d.get("preloaded_rows") else "")
                     + (f"; dense part in {d['dtype']}" if d.get("dtype", "float32") != "float32" else "") + ")")
        lines.append(f"{'path':22} {'samples/s':>10} {'ms/batch':>9} {'lookup ms':>9}")
        lines.append(f"{'ParameterServer':22} {d['server_samples_per_s']:10,.0f} {d['server_ms_per_batch']:9.1f} "
                     f"{d['server_lookup_ms_per_batch']:9.1f}")
        lines.append(f"{'persistent tier only':22} {d['persistent_samples_per_s']:10,.0f} {d['persistent_ms_per_batch']:9.1f} "
                     f"{d['persistent_lookup_ms_per_batch']:9.1f}")
        lines.append(f"ratio {d['ratio']:.2f}x end to end (target >= 5x: {'met' if d['ratio'] >= 5 else 'MISSED'}), "
                     f"{d['lookup_ratio']:.1f}x on the lookups alone; device hit rate {d['device_hit_rate_timed']:.3f}, "
                     f"{d['unique_keys_per_batch']:,.0f} unique keys a batch")
        parts = ", ".join(f"{k} {v:.1f}" for k, v in d["server_lookup_breakdown_ms_per_batch"].items())
        lines.append(f"ParameterServer lookup ms a batch: {parts}")
        calls = ", ".join(f"{k} {v:.0f}" for k, v in d.get("tier_calls_per_batch", {}).items())
        lines.append(f"tier calls a batch: {calls}")
    return "\n".join(lines)
