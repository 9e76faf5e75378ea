"""Prometheus metrics, one registry per app; also the worker's Observer."""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.queue import DROP_REASONS, WorkItem
from server.metrics_tei import TEIMetrics

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_PENDING_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # a queue holds up to max_queue_size
_PLAN_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """All turboserve_* series. Methods are counter increments, nothing more."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.request_duration = Histogram(
            "turboserve_request_duration_seconds", "Time from request arrival to response start.", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("turboserve_requests", "Requests answered, by route and status.", ["route", "status"], registry=r)
        self.queue_wait = Histogram(
            "turboserve_queue_wait_seconds", "Time a sequence waited before its batch started.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram(
            "turboserve_inference_duration_seconds", "Model time of one batch.", buckets=_LATENCY_BUCKETS, registry=r)
        self.plan_duration = Histogram(
            "turboserve_scheduler_plan_seconds", "Time the scheduler took to plan the pending sequences into batches, "
            "once before each batch (and again when a held batch's queue changes); the device waits meanwhile.",
            buckets=_PLAN_BUCKETS, registry=r)
        self.plan_pending = Histogram(
            "turboserve_scheduler_plan_pending", "Sequences pending when the scheduler planned.", buckets=_PENDING_BUCKETS,
            registry=r)
        self.batch_size = Histogram("turboserve_batch_size", "Sequences in one batch.", buckets=_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("turboserve_batch_tokens", "Packed tokens in one batch.", buckets=_TOKEN_BUCKETS, registry=r)
        self.tokens = Counter("turboserve_tokens", "Input tokens computed.", registry=r)
        self.dropped_total = Counter(
            "turboserve_requests_dropped", "Sequences dropped before compute, by reason: deadline (the request timed "
            "out while queued), disconnect (its client went away) or failed (another part of its request failed).",
            ["reason"], registry=r)
        for reason in DROP_REASONS:  # export every series from the start, at 0
            self.dropped_total.labels(reason)
        self.batch_failures = Counter("turboserve_batch_failures", "Sequences whose batch raised an error.", registry=r)
        self.batch_splits = Counter("turboserve_batch_splits", "Batches split in halves after running out of memory.", registry=r)
        self.queue_depth = Gauge("turboserve_queue_depth", "Sequences waiting for a batch.", registry=r)
        self.ready = Gauge("turboserve_ready", "1 when the model is loaded and warm.", registry=r)
        self.deadline_missed = Counter(
            "turboserve_deadline_missed", "Sequences whose batch finished after their deadline (arrival + SLO).", registry=r)
        self.cost_error = Histogram(
            "turboserve_cost_model_error_ratio", "|predicted - observed| / observed batch time, before refinement.",
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=r)
        self._recent_errors: deque[float] = deque(maxlen=512)
        self.cost_overrun = Gauge(
            "turboserve_cost_model_overrun_ratio", "Running 90th percentile of observed / predicted batch time (the "
            "factor dp's overload shedding plans with; 1 until batches overrun the model).", registry=r)
        self.cost_overrun.set(1.0)
        self.tei: TEIMetrics | None = None  # TEI's names, made with the first engine (its input limit)
        self._queues: list = []
        r.register(_PlanAheadCollector(self._queues))

    def watch_engine(self, queue, cost, max_input_length: int) -> TEIMetrics:
        """Read an engine's queue (depths summed over the engines: the model and a reranker) and, for the first
        engine, its cost model's overrun at scrape time; TEI's metric names (server/metrics_tei.py), made once."""
        self._queues.append(queue)
        if len(self._queues) == 1:
            self.queue_depth.set_function(self._depth)
            if cost is not None:
                self.cost_overrun.set_function(cost.pessimism)
        if self.tei is None:
            self.tei = TEIMetrics(self.registry, max_input_length, self._depth)
        return self.tei

    def _depth(self) -> int:
        return sum(q.depth for q in self._queues)

    # Observer hooks, called from the worker thread.
    def batch_done(self, items: list[WorkItem], seconds: float, cost_error: float | None) -> None:
        tokens = sum(it.length for it in items)
        if cost_error is not None:
            self.cost_error.observe(abs(cost_error))
            self._recent_errors.append(cost_error)
        self.inference_duration.observe(seconds)
        if self.tei is not None:
            self.tei.record_batch(len(items), tokens, seconds)
        self.batch_size.observe(len(items))
        self.batch_tokens.observe(tokens)
        self.tokens.inc(tokens)
        finished = time.perf_counter()  # the clock WorkItem deadlines are on
        missed = 0
        for it in items:
            self.queue_wait.observe(it.queue_seconds)
            missed += finished > it.deadline
        if missed:
            self.deadline_missed.inc(missed)

    def planned(self, pending: int, seconds: float) -> None:
        """From the worker thread, after each plan (BatchQueue.on_plan)."""
        self.plan_duration.observe(seconds)
        self.plan_pending.observe(pending)

    def dropped(self, count: int, reason: str) -> None:
        self.dropped_total.labels(reason).inc(count)

    def batch_failed(self, count: int) -> None:
        self.batch_failures.inc(count)

    def batch_split(self, count: int) -> None:
        self.batch_splits.inc()

    def watch_arena(self, arena) -> None:
        """Export the memory arena's size and chunk traffic, read at scrape time."""
        r = self.registry
        Gauge("turboserve_memory_arena_bytes", "Bytes the memory arena holds for intermediates.",
              registry=r).set_function(lambda: arena.reserved_bytes)
        Gauge("turboserve_memory_arena_chunk_allocations", "Chunks the memory arena has allocated since start.",
              registry=r).set_function(lambda: arena.stats.chunk_allocations)
        Gauge("turboserve_memory_arena_plan_misses", "Batches whose memory plan was not cached.",
              registry=r).set_function(lambda: arena.stats.plan_misses)

    def watch_embeddings(self, ps, consumer=None) -> None:
        """Export the parameter server's tier counters and, with a stream consumer, its message counts."""
        from embeddings.metrics import EmbeddingCollector

        self.registry.register(EmbeddingCollector(ps))
        if consumer is not None:
            self.registry.register(_StreamCollector(consumer))

    def cost_error_summary(self) -> dict:
        """Median and p90 of |relative error| over the last batches, and the signed median (bias)."""
        errors = list(self._recent_errors)
        if not errors:
            return {"batches": 0}
        absolute = sorted(abs(e) for e in errors)
        return {"batches": len(errors), "median_abs": statistics.median(absolute),
                "p90_abs": absolute[int(0.9 * (len(absolute) - 1))], "median_signed": statistics.median(errors)}


class _PlanAheadCollector(Collector):
    """`turboserve_scheduler_plans_ahead_total{outcome}`: batches planned while the one before ran
    (scheduler.plan_ahead), run as planned or planned again when the worker took them; summed over the engines."""

    def __init__(self, queues: list) -> None:
        self.queues = queues

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("turboserve_scheduler_plans_ahead", "Batches planned while the batch before them "
                                     "ran (scheduler.plan_ahead): run as planned, or planned again when the worker took "
                                     "them (a more urgent request arrived, the plan would wait, or its requests left).",
                                     labels=["outcome"])
        family.add_metric(["run"], sum(q.ahead_used for q in self.queues))
        family.add_metric(["planned_again"], sum(q.ahead_dropped for q in self.queues))
        yield family


class _StreamCollector(Collector):
    """`turboserve_embedding_stream_messages_total{outcome}` (applied | rejected | published), `..._rows_total`,
    `..._settled_total`, `..._settle_dropped_total`,
    `..._claimed_total`, `..._rows_superseded_total`, `..._held_waits_total` and `turboserve_embedding_stream_errors_total{kind}` (redis | update), read at scrape time."""

    def __init__(self, consumer) -> None:
        self.consumer = consumer

    def collect(self) -> Iterator[Metric]:
        c = self.consumer.counters()
        messages = CounterMetricFamily("turboserve_embedding_stream_messages", "Update stream entries handled.", labels=["outcome"])
        messages.add_metric(["applied"], c["applied"])
        messages.add_metric(["rejected"], c["rejected"])
        messages.add_metric(["published"], c.get("published", 0))  # HTTP updates this replica put on the stream
        yield messages
        yield CounterMetricFamily("turboserve_embedding_stream_settled", "Applied entries whose rows were re-read from "
                                  "RocksDB into Redis and the device cache after update_settle_s.", value=c.get("settled", 0))
        yield CounterMetricFamily("turboserve_embedding_stream_settle_dropped", "Applied entries not settled: too many "
                                  "waiting.", value=c.get("settle_dropped", 0))
        yield CounterMetricFamily("turboserve_embedding_stream_rows", "Rows written by applied stream entries.", value=c["rows"])
        yield CounterMetricFamily("turboserve_embedding_stream_claimed", "Pending entries taken over from stopped consumers.",
                                  value=c["claimed"])
        yield CounterMetricFamily("turboserve_embedding_stream_rows_superseded", "Rows of entries not applied: this "
                                  "replica held a newer value of the key.", value=c.get("rows_superseded", 0))
        yield CounterMetricFamily("turboserve_embedding_stream_held_waits", "Reads that stopped at an entry one of whose "
                                  "keys this replica was writing over HTTP, to read it again once published.",
                                  value=c.get("held_waits", 0))
        errors = CounterMetricFamily("turboserve_embedding_stream_errors", "Failed stream reads and updates.", labels=["kind"])
        errors.add_metric(["redis"], c["redis_errors"])
        errors.add_metric(["update"], c["update_errors"])
        yield errors
