"""Prometheus metrics of a ParameterServer, read from its counters at scrape time.

Register with the server's registry: `registry.register(EmbeddingCollector(parameter_server))`.
Nothing is counted twice: the tiers keep plain integer counters and this collector reads them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from embeddings.hierarchy import ParameterServer


class EmbeddingCollector(Collector):
    """Exports `turboserve_embedding_cache_{hits,misses}_total{tier}`, `..._errors_total{tier}`,
    `turboserve_embedding_defaults_total{reason}` (async | missing), `turboserve_embedding_lookup_keys_total`,
    `turboserve_embedding_shared_fills_skipped_total`,
    `turboserve_embedding_volatile_preloaded_rows_total` and `turboserve_embedding_device_cache_bytes`."""

    def __init__(self, server: ParameterServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        """One sample per tier and counter, from `ParameterServer.stats()`."""
        stats = self.server.stats()
        own = stats.pop("server")
        families = {
            "hits": CounterMetricFamily("turboserve_embedding_cache_hits", "Keys found in the tier (unique per batch).", labels=["tier"]),
            "misses": CounterMetricFamily("turboserve_embedding_cache_misses", "Keys the tier did not hold.", labels=["tier"]),
            "errors": CounterMetricFamily("turboserve_embedding_tier_errors", "Failed backend calls (answered as misses).", labels=["tier"]),
        }
        for tier, counts in stats.items():
            for key, family in families.items():
                family.add_metric([tier], counts.get(key, 0))
        yield from families.values()
        defaults = CounterMetricFamily("turboserve_embedding_defaults", "Default vectors served, by reason.", labels=["reason"])
        defaults.add_metric(["async"], own["defaults_async"])
        defaults.add_metric(["missing"], own["defaults_missing"])
        yield defaults
        yield CounterMetricFamily("turboserve_embedding_lookup_keys", "Keys asked for (before de-duplication).", value=own["keys"])
        yield CounterMetricFamily("turboserve_embedding_shared_fills_skipped",
                                  "Rows not filled into the shared Redis tier because this replica was behind the update stream.",
                                  value=own["volatile_fills_skipped"])
        yield CounterMetricFamily("turboserve_embedding_volatile_preloaded_rows",
                                  "Rows loaded from the persistent tier into the volatile tier at start-up (embeddings.volatile_preload).",
                                  value=own["volatile_preloaded"])
        cache = self.server.device_cache
        yield GaugeMetricFamily("turboserve_embedding_device_cache_bytes", "Bytes held by the device cache.",
                                value=cache.memory_bytes if cache is not None else 0)
