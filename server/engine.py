"""The bridge between async routes and the batching worker: tokenize, admit, await, post-process."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Literal

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from configs.settings import SchedulerSettings, Settings
from models.runtime import Embedder, ModelInfo
from models.tokenizer import Encoded, TextTokenizer
from scheduler.cost_model import CostModel
from scheduler.errors import BackendError, DeadlineExceeded, NotReady, Overloaded
from scheduler.planner import Limits, PolicyConfig
from scheduler.queue import DEADLINE, DISCONNECT, DROP_REASONS, BatchQueue, WorkItem
from scheduler.worker import BatchWorker
from server.errors import ClientDisconnected, EmptyInput, InvalidRequest, ModelNotFound, TooLarge, WrongModelKind, kind_of
from server.logs import printable
from server.metrics import Metrics
from server.middleware import Timing
from server.request_headers import request_timeout, scheduling
from server.stats import InferStats

log = logging.getLogger(__name__)

# Inputs longer than this (in characters, all together) are tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 4096


async def _wait_disconnect(request: Request) -> None:
    """Return when the client closes its connection (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _off_the_loop_if_long(texts: list[str], fn, *args):
    """fn(*args) here for short texts; in the thread pool when they are long, so the event loop keeps serving."""
    if sum(len(t) for t in texts) > _INLINE_TOKENIZE_CHARS:
        return await run_in_threadpool(fn, *args)
    return fn(*args)


def policy_config(sched: SchedulerSettings) -> PolicyConfig:
    """The planner's knobs from the scheduler settings (also what the live benchmark simulates)."""
    return PolicyConfig(
        name=sched.policy,
        fixed_batch_size=sched.fixed_batch_size,
        preferred_batch_sizes=tuple(sched.preferred_batch_sizes),
        max_queue_delay=sched.max_queue_delay_ms / 1000,
        max_wait=sched.max_wait_ms / 1000,
        late_grace=sched.late_grace_slos,
        shed_longest=sched.shed_longest,
        deadline_margin=sched.deadline_margin,
        margin_averaging=sched.margin_averaging,
        shed_margin=sched.shed_margin,
        order_tolerance=sched.order_tolerance,
        keep_up=sched.keep_up,
        partition_cost=sched.partition_cost,
        plan_ahead=sched.plan_ahead,
        answer_after_plan=sched.answer_after_plan,
    )


# Ids of client requests of several inputs (WorkItem.group), one count for every engine (a /vertex request may
# reach the model's and the reranker's); itertools.count's next() is atomic.
_GROUPS = itertools.count()
# A request scope's key for the group id of a client request whose parts call Engine.run each (a /vertex request's
# instances), so that the planner keeps their sequences together as one request.
GROUP_KEY = "turboserve.group"


def new_group() -> int:
    """A fresh client request id for GROUP_KEY."""
    return next(_GROUPS)


# infinity's clients send this when the caller names no model (its server then takes its first model).
NOT_SPECIFIED = "default/not-specified"


class Engine:
    """One model on one device: its tokenizer, queue and worker thread."""

    def __init__(self, settings: Settings, embedder: Embedder, tokenizer: TextTokenizer, info: ModelInfo, metrics: Metrics,
                 cost: CostModel | None = None):
        self.settings = settings
        self.info = info
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.cost = cost
        self.metrics = metrics
        sched = settings.scheduler
        policy = policy_config(sched)
        limits = Limits(sched.max_batch_tokens, sched.max_batch_requests)
        self.queue = BatchQueue(sched.max_queue_size, limits, policy, cost, on_plan=metrics.planned)
        self._wake_pending = False
        self.worker = BatchWorker(self.queue, embedder, metrics)
        self.stats = InferStats()  # Triton's statistics extension (executions: worker.executions)
        self.tei = metrics.watch_engine(self.queue, cost, info.max_input_length)

    def start(self) -> None:
        self.worker.start()

    def stop(self, timeout: float) -> None:
        """Refuse new work, let the worker finish what was admitted."""
        self.queue.close()
        self.worker.join(timeout)

    @property
    def healthy(self) -> bool:
        return self.worker.alive

    def scheduler_info(self) -> dict:
        """The policy, the cost model and how well it predicts live batches (for /info)."""
        out: dict = {"policy": self.settings.scheduler.policy, "slo_ms": self.settings.scheduler.slo_ms}
        if self.queue.policy.plan_ahead:
            out["plans_ahead"] = {"run": self.queue.ahead_used, "planned_again": self.queue.ahead_dropped}
        if self.cost is not None:
            out["cost_model"] = self.cost.summary()
            out["cost_model_error"] = self.metrics.cost_error_summary()
        arena = getattr(self.embedder, "arena", None)
        if arena is not None:
            st = arena.stats
            out["memory_arena"] = {"reserved_bytes": arena.reserved_bytes, "intermediates": len(arena.lifetimes),
                                   "chunk_allocations": st.chunk_allocations, "chunk_releases": st.chunk_releases,
                                   "plan_hits": st.plan_hits, "plan_misses": st.plan_misses,
                                   "last_plan_ms": round(1e3 * st.last_plan_seconds, 3)}
        graphs = getattr(self.embedder, "graphs", None)
        if graphs is not None:
            out["cuda_graphs"] = graphs.info()
        return out

    def check_batch(self, count: int) -> None:
        if count == 0:
            raise EmptyInput("input is empty: give at least one text")
        limit = self.settings.server.max_client_batch_size
        if count > limit:
            raise TooLarge(f"{count} inputs in one request, more than max_client_batch_size={limit}")

    def prompt(self, prompt_name: str | None) -> str:
        """The text put before each text input (sentence-transformers' prompts): the named prompt, else the
        model's default one, else none; InvalidRequest for a name the model does not define."""
        prompts = self.info.prompts
        if prompt_name is None:
            if self.settings.model.default_prompt is not None:
                return self.settings.model.default_prompt
            return prompts.get(self.info.default_prompt_name, "") if self.info.default_prompt_name else ""
        if prompt_name not in prompts:
            known = ", ".join(sorted(prompts)) if prompts else "none: this model defines no prompts"
            raise InvalidRequest(f"prompt_name {prompt_name!r} is not one of the model's prompts ({known})")
        return prompts[prompt_name]

    def check_model(self, name: str | None) -> None:
        """ModelNotFound unless `name` (a request's `model`; None or infinity's placeholder: not given) is the served
        model's: its name, one of model.aliases, or a Hugging Face repo id of it (`org/<name>`, vLLM's default name
        for a model served from the Hub)."""
        served, aliases = self.info.name, self.settings.model.aliases
        if name is not None and name not in (NOT_SPECIFIED, served, *aliases) and name.rpartition("/")[2] != served:
            also = f" (also answering to {', '.join(map(repr, aliases))})" if aliases else ""
            raise ModelNotFound(f"model {name!r} is not served here; this server serves {served!r}{also}; "
                                "model.aliases adds names")

    def require(self, *kinds: str) -> None:
        """WrongModelKind unless the served model is of one of `kinds` (ModelInfo.kind)."""
        if self.info.kind not in kinds:
            def a(kind: str) -> str:
                return f"{'an' if kind[0] == 'e' else 'a'} {kind} model"
            routes = {"embedding": "/embed, /v1/embeddings", "reranker": "/rerank, /v1/rerank",
                      "classifier": "/predict, /v1/classify"}[self.info.kind]
            raise WrongModelKind(f"model is not {' or '.join(map(a, kinds))}: this server serves {a(self.info.kind)} "
                                 f"(its routes: {routes})")

    def refuse_sparse(self, what: str) -> None:
        """BackendError (TEI's 424) when the model is a SPLADE one, which `what` does not serve (TEI's answer)."""
        if self.info.sparse:
            hint = " (or normalize false for the dense vocabulary-sized vectors)" if what == "normalize" else ""
            raise BackendError(f"`{what}` is not available for SPLADE models; use /embed_sparse{hint}")

    def require_sparse(self) -> None:
        """BackendError (TEI's 424) unless the model is a SPLADE one (/embed_sparse, gRPC EmbedSparse)."""
        if not self.info.sparse:
            kind = "an embedding model" if self.info.kind == "embedding" else f"a {self.info.kind} model"
            raise BackendError(f"model is not an embedding model with splade pooling: /embed_sparse needs one, this "
                               f"server serves {kind}")

    def _admit(self, count: int, truncate: bool | None) -> bool:
        """Refuse a request of `count` inputs before any tokenizing (empty, too many, or no room in the queue:
        under overload most requests are refused, so a 429 costs next to nothing); the truncation to use (None:
        model.auto_truncate decides)."""
        self.check_batch(count)
        try:
            self.queue.check_room(count)
        except Overloaded:  # TEI counts a request refused for a full queue as a request and an overloaded failure
            self.tei.record_request(count)
            self.tei.record_failure("Overloaded")
            raise
        return self.settings.model.auto_truncate if truncate is None else truncate

    def prompt_limit(self, tokens: int | None) -> int | None:
        """vLLM's truncate_prompt_tokens: None (not asked), or the tokens an input is cut to, special tokens
        included: -1 is the model's limit; over it, or 0, is refused (as vLLM refuses it)."""
        if tokens is None:
            return None
        limit = self.info.max_input_length
        if tokens == -1:
            return limit
        if not 1 <= tokens <= limit:
            raise InvalidRequest(f"truncate_prompt_tokens must be -1 (the model's limit) or 1..{limit}, got {tokens}")
        return tokens

    async def tokenize_pairs(self, pairs: list[tuple[str, str]], timing: Timing, truncate: bool | None = None,
                             direction: Literal["right", "left"] = "right", positions: list[int] | None = None,
                             limit: int | None = None) -> list[Encoded]:
        """Tokenize (query, text) pairs for a cross-encoder or a pair classifier (checks as tokenize's). positions:
        each pair's place in the request, for error messages (default: its place in `pairs`); limit: cut each pair
        to this many tokens (prompt_limit), truncation implied."""
        truncate = self._admit(len(pairs), True if limit is not None else truncate)
        for i, (a, b) in enumerate(pairs):
            if not a or not b:
                raise EmptyInput(f"pair {i if positions is None else positions[i]} has an empty text")
        started = time.perf_counter()
        texts = [a + b for a, b in pairs]  # only their length matters below
        encoded = await _off_the_loop_if_long(texts, self.tokenizer.encode_pairs, pairs, truncate, direction, positions, limit)
        timing.tokenization += time.perf_counter() - started
        return encoded

    async def tokenize(self, inputs: str | list[str] | list[int] | list[list[int]] | list[str | list[int]], timing: Timing,
                       truncate: bool | None = None, direction: Literal["right", "left"] = "right",
                       prompt_name: str | None = None, kinds: tuple[str, ...] = ("embedding",),
                       positions: list[int] | None = None, limit: int | None = None) -> list[Encoded]:
        """Tokenize a text, texts, token ids or lists of them, or (TEI) a batch mixing texts and id lists (a prompt
        goes before each text, as sentence-transformers puts it; token ids are used as given); raise the errors the
        routes map to 4xx, naming each input by its place in the request (or by `positions`, when the inputs are
        part of a request). truncate None: model.auto_truncate decides. kinds: the model kinds the calling route
        serves. limit: cut each input to this many tokens (prompt_limit), truncation implied."""
        self.require(*kinds)
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]  # one text, or one list of token ids
        truncate = self._admit(len(inputs), True if limit is not None else truncate)
        started = time.perf_counter()
        at_ids = [i for i, x in enumerate(inputs) if isinstance(x, list)]
        at_texts = [i for i, x in enumerate(inputs) if not isinstance(x, list)] if len(at_ids) < len(inputs) else []
        place = (lambda i: i) if positions is None else positions.__getitem__  # noqa: E731
        if at_ids and prompt_name is not None:
            raise InvalidRequest("prompt_name applies to text inputs; token ids are used as given")
        if not at_texts:
            encoded = self.tokenizer.check_ids(inputs, truncate, direction, positions, limit)  # type: ignore[arg-type]
        else:
            texts = []
            for i in at_texts:
                if not isinstance(inputs[i], str):
                    raise InvalidRequest(f"input {place(i)} must be a string")
                if not inputs[i]:
                    raise EmptyInput(f"input {place(i)} is an empty string")
                texts.append(inputs[i])
            prefix = self.prompt(prompt_name)
            if prefix:
                texts = [prefix + text for text in texts]
            encoded = await _off_the_loop_if_long(texts, self.tokenizer.encode, texts, truncate, direction,
                                                  [place(i) for i in at_texts], limit)
            if at_ids:  # a mixed batch: each answer in its input's place
                ids = self.tokenizer.check_ids([inputs[i] for i in at_ids], truncate, direction,  # type: ignore[misc]
                                               [place(i) for i in at_ids], limit)
                by_place = dict(zip(at_texts, encoded)) | dict(zip(at_ids, ids))
                encoded = [by_place[i] for i in range(len(inputs))]
        timing.tokenization += time.perf_counter() - started
        return encoded

    async def describe(self, texts: list[str], add_special_tokens: bool, prompt_name: str | None) -> list[list[dict]]:
        """TEI's /tokenize of `texts`, the prompt put first (offsets then count in the prompted text, as TEI's do)."""
        self.check_batch(len(texts))
        prefix = self.prompt(prompt_name)
        texts = [prefix + text for text in texts]
        return await _off_the_loop_if_long(texts, self.tokenizer.describe, texts, add_special_tokens)

    async def run(self, encoded: list[Encoded], request: Request, timing: Timing,
                  per_token: bool = False) -> np.ndarray | list[np.ndarray]:
        """Queue every sequence, wait for all of them (or a disconnect, or the timeout); [n, dim] pooled, or
        with per_token a list of [length, dim], every token's last hidden state. Counted in self.stats (bad
        scheduling headers are refused first, like any other bad input: not counted)."""
        slo, priority = scheduling(request.headers, self.settings.scheduler.slo_ms)
        timeout = request_timeout(request.headers, self.settings.server.request_timeout_s)
        self.tei.record_request(len(encoded))
        try:
            out = await self._run(encoded, request, timing, per_token, slo, priority, timeout)
        except BaseException as exc:  # refused, timed out, failed, or cancelled
            self.stats.record(timing, len(encoded), ok=False)
            kind = kind_of(exc)
            # A client that left, or a cancelled task, is no failure of TEI's kinds (turboserve counts it as dropped).
            if not isinstance(exc, (ClientDisconnected, asyncio.CancelledError)):
                self.tei.record_failure(kind.tei_type if kind is not None else None)
            raise
        self.stats.record(timing, len(encoded), ok=True)
        self.tei.record_success(len(encoded), timing, time.perf_counter() - timing.started)
        return out

    async def _run(self, encoded: list[Encoded], request: Request, timing: Timing, per_token: bool,
                   slo: float, priority: int, timeout: float) -> np.ndarray | list[np.ndarray]:
        now = time.perf_counter()
        expires_at = timing.started + timeout  # the hard deadline and the SLO count from arrival, tokenizing included
        group = getattr(request, "scope", {}).get(GROUP_KEY)  # a part of a larger client request (a gRPC Call: no scope)
        if group is None:
            group = new_group() if len(encoded) > 1 else -1
        items = [WorkItem(e.ids, enqueued_at=now, deadline=timing.started + slo, priority=priority, group=group,
                          expires_at=expires_at, per_token=per_token, segment=e.segment) for e in encoded]
        if not self.worker.alive:
            raise NotReady("the batching worker has stopped")
        if expires_at <= now:
            self.metrics.dropped(len(items), DEADLINE)
            raise DeadlineExceeded(f"no answer within {timeout * 1000:.0f} ms; the request was not computed")
        self.queue.submit(items, wake=False)  # raises Overloaded / NotReady
        if not self._wake_pending:  # wake the worker once, after the other requests of this loop iteration
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._wake)
        results = asyncio.gather(*(asyncio.wrap_future(it.future) for it in items))
        # If we stop waiting, nobody reads the gather; consume its outcome so asyncio does not log it.
        results.add_done_callback(lambda f: f.cancelled() or f.exception())
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({results, gone}, timeout=expires_at - now, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError as exc:  # the task itself was cancelled (a gRPC call past its deadline, a shutdown;
            # a /vertex instance, its drop reason named, when another instance failed)
            self._give_up(items, exc.args[0] if exc.args and exc.args[0] in DROP_REASONS else DISCONNECT)
            results.cancel()
            raise
        finally:
            gone.cancel()
        if results not in done:
            reason = DISCONNECT if gone in done else DEADLINE
            withdrawn = self._give_up(items, reason)
            results.cancel()
            if reason == DISCONNECT:
                log.info("request %s: client disconnected; its queued sequences were dropped", printable(timing.request_id))
                raise ClientDisconnected("client closed the connection before the answer was ready")
            log.warning("request %s: no answer within %.3fs; its queued sequences were dropped", printable(timing.request_id),
                        timeout)
            what = "the request was not computed" if withdrawn == len(items) else \
                f"{len(items) - withdrawn} of its {len(items)} inputs had left the queue for a batch; the answer was dropped"
            raise DeadlineExceeded(f"no answer within {timeout * 1000:.0f} ms; {what}")
        # Raises BackendError if a batch failed (the worker dropped the request's other sequences still waiting),
        # DeadlineExceeded if the worker found it expired first.
        rows = results.result()
        timing.tokens = sum(it.length for it in items)
        timing.queue = max(it.queue_seconds for it in items)
        timing.inference = max(it.inference_seconds for it in items)
        return list(rows) if per_token else np.stack(rows)

    def _wake(self) -> None:
        self._wake_pending = False
        self.queue.wake()

    def _give_up(self, items: list[WorkItem], reason: str) -> int:
        """Drop this request's sequences that were not computed yet, counted once under `reason`: those still queued
        are withdrawn here (their room frees at once); those the worker already took but has not started, it skips
        when it sees the cancelled future. A batch already running finishes unread. Returns how many were withdrawn."""
        for it in items:
            it.drop_reason = reason  # before cancelling: the worker reads it when it skips the item
        withdrawn = self.queue.withdraw(items)
        for it in items:
            it.future.cancel()
        if withdrawn:
            self.metrics.dropped(len(withdrawn), reason)
        return len(withdrawn)

    def check_dimensions(self, dimensions: int | None) -> int | None:
        """None when the full size is asked for; raise InvalidRequest when the model cannot truncate."""
        if dimensions is None or dimensions == self.info.dim:
            return None
        if dimensions not in (allowed := self.info.matryoshka_dimensions):
            sizes = ", ".join(map(str, allowed)) if allowed else "none besides the full size"
            raise InvalidRequest(f"dimensions={dimensions} is not supported by model {self.info.name} "
                                 f"(output size {self.info.dim}; Matryoshka sizes: {sizes})")
        return dimensions
