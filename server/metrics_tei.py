"""Text Embeddings Inference's metric names, beside turboserve's own, so that dashboards and alerts written for
TEI read this server unmodified: the same names, label values and histogram buckets as TEI's router.

- te_queue_size (gauge): sequences waiting for a batch.
- te_batch_next_size, te_batch_next_tokens (histograms, buckets 2^0..2^12 and 2^0..2^20): each batch's
  sequences and tokens; te_batch_inference_duration (seconds), te_batch_inference_count / _success counters.
- te_request_count{method}, te_request_success{method} (method "single" for one input, "batch" for more), and
  te_request_failure{err} (TEI's err values: overloaded, validation, tokenization, empty, inference, ...).
- te_request_duration, te_request_tokenization_duration, te_request_queue_duration,
  te_request_inference_duration (seconds; TEI's 35 geometric buckets from 15 µs), te_request_input_length
  (tokens; buckets 2^0.. up to the model's input limit): per successful request, as TEI records them.

TEI's counters are written under their bare names, as TEI's exporter (metrics-rs) writes them; prometheus_client
would add `_total` to a counter's name, so they are collected here by hand and typed `untyped` (PromQL's rate()
and increase() read them the same)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

from prometheus_client import Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

DURATION_BUCKETS = tuple(0.00001 * 1.5 ** (i + 1) for i in range(35))

# turboserve's error kinds (server/errors.py, their TEI error_type) -> TEI's te_request_failure err label.
FAILURE_LABELS = {"Overloaded": "overloaded", "Validation": "validation", "Tokenizer": "tokenization", "Empty": "empty",
                  "Backend": "inference", "Unhealthy": "unhealthy"}


class TEIMetrics(Collector):
    """TEI's series on one registry; the record_* methods are called by the engine and its worker."""

    def __init__(self, registry, max_input_length: int, queue_depth) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        Gauge("te_queue_size", "Sequences waiting for a batch (TEI's name).", registry=registry).set_function(queue_depth)
        self.batch_size = Histogram("te_batch_next_size", "Sequences in a batch (TEI's name).",
                                    buckets=tuple(2.0 ** i for i in range(13)), registry=registry)
        self.batch_tokens = Histogram("te_batch_next_tokens", "Tokens in a batch (TEI's name).",
                                      buckets=tuple(2.0 ** i for i in range(21)), registry=registry)
        self.batch_duration = Histogram("te_batch_inference_duration", "Model time of a batch, seconds (TEI's name).",
                                        buckets=DURATION_BUCKETS, registry=registry)
        self.request = {part: Histogram(f"te_request{part}_duration", f"Request{part.replace('_', ' ')} time, seconds "
                                        "(TEI's name).", buckets=DURATION_BUCKETS, registry=registry)
                        for part in ("", "_tokenization", "_queue", "_inference")}
        self.input_length = Histogram("te_request_input_length", "Tokens of a request (TEI's name).",
                                      buckets=tuple(2.0 ** i for i in range(20) if 2 ** i <= max_input_length),
                                      registry=registry)
        registry.register(self)

    def _inc(self, name: str, **labels: str) -> None:
        with self._lock:
            self._counts[(name, tuple(sorted(labels.items())))] += 1

    def record_batch(self, sequences: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(sequences)
        self.batch_tokens.observe(tokens)
        self.batch_duration.observe(seconds)
        self._inc("te_batch_inference_count")
        self._inc("te_batch_inference_success")

    def record_request(self, inputs: int) -> None:
        self._inc("te_request_count", method="single" if inputs == 1 else "batch")

    def record_success(self, inputs: int, timing, total_seconds: float) -> None:
        self._inc("te_request_success", method="single" if inputs == 1 else "batch")
        self.request[""].observe(total_seconds)
        self.request["_tokenization"].observe(timing.tokenization)
        self.request["_queue"].observe(timing.queue)
        self.request["_inference"].observe(timing.inference)
        self.input_length.observe(timing.tokens)

    def record_failure(self, error_type: str | None) -> None:
        self._inc("te_request_failure", err=FAILURE_LABELS.get(error_type or "", "inference"))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts = dict(self._counts)
        families: dict[str, Metric] = {}
        for (name, labels), value in sorted(counts.items()):
            family = families.setdefault(name, Metric(name, f"{name} (TEI's name; a counter)", "unknown"))
            family.add_sample(name, dict(labels), value)  # the bare name, as TEI's exporter writes it
        yield from families.values()
