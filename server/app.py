"""Build the FastAPI app: routes, error mapping, edge middleware, and a lifespan that loads the model
in the background (routes answer 503 until it is warm) and drains the queue on shutdown."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import server
from configs.settings import Settings, check_model_dirs
from models.config import ModelFolderError
from models.runtime import Embedder, ModelInfo, load_model
from models.tokenizer import TextTokenizer
from scheduler.errors import NotReady
from server import (
    routes_kserve,
    routes_openai,
    routes_recommend,
    routes_rerank,
    routes_tei,
    routes_triton,
    routes_vertex,
    routes_vllm,
)
from server.deps import json_media_type
from server.engine import Engine
from server.errors import (
    KINDS,
    UNSUPPORTED_MEDIA,
    VALIDATION,
    ErrorKind,
    api_family,
    describe_validation,
    error_body,
    error_responses,
    kind_of,
)
from server.metrics import Metrics
from server.middleware import EdgeMiddleware, HeadAsGet
from server.profiling import build_cost_model, save_refined
from server.recommend import build_recommender
from server.shared_memory import SharedMemoryRegistry

log = logging.getLogger(__name__)

Loader = Callable[[], tuple[Embedder, TextTokenizer, ModelInfo]]


def default_loader(settings: Settings) -> Loader:
    """Load the configured model folder (or the embedded default)."""
    m = settings.model

    def load():
        if m.num_threads:
            import torch  # only the real model needs it

            torch.set_num_threads(m.num_threads)
        return load_model(m.path, m.name, m.device, m.dtype, m.max_input_length, m.pooling, m.normalize,
                          m.matryoshka_dimensions, m.memory_arena, m.arena_min_chunk_mib, m.arena_release_after,
                          m.default_prompt_name, min(m.cuda_graph_max_tokens, settings.scheduler.max_batch_tokens),
                          settings.scheduler.max_batch_requests,  # no graph for batches the scheduler never makes
                          m.classifier_from_token)

    return load


def warm_up(embedder: Embedder, tokenizer: TextTokenizer) -> None:
    """Compile every CUDA kernel (on a GPU), then one short and one longest input through the model,
    so the first request pays no warm-up."""
    device = getattr(embedder, "device", None)
    if device is not None and device.type == "cuda":
        from kernels import compile_all
        from kernels.cuda import available

        if available():
            compile_all(next(embedder.encoder.parameters()).dtype)
    short = tokenizer.encode(["warm up"])[0].ids
    longest = tokenizer.encode(["warm " * tokenizer.max_length], truncate=True)[0].ids
    embedder.embed([short, longest])


def _engine(settings: Settings, loaded: tuple[Embedder, TextTokenizer, ModelInfo], metrics: Metrics) -> Engine:
    """Warm the model up, build (or load) its cost model, and start an engine on it."""
    embedder, tokenizer, info = loaded
    if settings.model.warmup:
        warm_up(embedder, tokenizer)
    # Every policy gets the cost model: dp plans with it, and all of them report its predictions.
    # JSON logs: no progress bar, whose partial lines would break one-object-a-line.
    cost, found = build_cost_model(settings, embedder, info, progress=settings.server.log_format == "text")
    log.info("cost model %s for %s: %s", "loaded" if found else "measured", info.name, cost.summary()["coefficients_seconds"])
    engine = Engine(settings, embedder, tokenizer, info, metrics, cost)
    engine.start()
    return engine


def _reranker(settings: Settings, metrics: Metrics) -> Engine:
    """The engine of reranker.path (a cross-encoder or classifier served beside the model): its own model
    settings, queue and worker; the scheduler and server settings are the main model's."""
    own = settings.model_copy(update={"model": settings.reranker})
    loaded = default_loader(own)()
    if loaded[2].kind == "embedding":
        raise ModelFolderError(f"reranker.path {settings.reranker.path} is an embedding model, not a cross-encoder or classifier")
    return _engine(own, loaded, metrics)


def _start_engine(app: FastAPI, settings: Settings, loader: Loader, metrics: Metrics) -> None:
    recommender, started = None, []
    try:
        if settings.embeddings.enabled:  # first: a bad DLRM folder or table fails fast
            recommender = build_recommender(settings)
        elif settings.recommend.model_path:
            log.warning("recommend.model_path is set but embeddings.enabled is false: the DLRM %s is not served "
                        "(its tables live in the embedding parameter server)", settings.recommend.model_path)
        loaded = loader()
        engine = _engine(settings, loaded, metrics)
        started.append(engine)
        if getattr(loaded[0], "arena", None) is not None:
            metrics.watch_arena(loaded[0].arena)
        if settings.reranker is not None:
            started.append(_reranker(settings, metrics))
            app.state.reranker = started[-1]
        if recommender is not None:
            metrics.watch_embeddings(recommender.ps, recommender.consumer)
            app.state.recommender = recommender
        app.state.engine = engine
        # Everything loaded so far (model, tokenizer, libraries) lives as long as the process: move it out
        # of the collector's reach, so a full collection later scans only request garbage (a gen-2 pass
        # over the start-up objects costs ~0.1 s on this CPU, a pause in whichever batch triggers it).
        gc.freeze()
        metrics.ready.set(1)
        for e in started:
            log.info("model %s ready (dim %d, max input %d tokens)", e.info.name, e.info.dim, e.info.max_input_length)
    except Exception as exc:
        app.state.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("model failed to load; the server stays unready")
        app.state.reranker = None
        for engine in started:
            engine.stop(timeout=5)
        if recommender is not None and app.state.recommender is None:
            recommender.close()


def create_app(settings: Settings, loader: Loader | None = None) -> FastAPI:
    """The whole HTTP application; `loader` defaults to the configured model (tests pass a small one).

    Raises PathNotAllowed when a model path lies outside server.model_dirs.
    """
    check_model_dirs(settings)
    metrics = Metrics()
    loader = loader or default_loader(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        grpc_server = None
        if settings.server.grpc_port is not None:  # first: a port it cannot bind stops start-up before the model loads
            from server.grpc_kserve import start_grpc  # grpcio only when asked for

            key = settings.server.api_key
            grpc_server, app.state.grpc_port = await start_grpc(
                app, settings.server.host, settings.server.grpc_port, key.get_secret_value() if key is not None else None,
                settings.server.payload_limit, settings.server.access_log,
                stream_window=settings.scheduler.max_queue_size, max_client_batch_size=settings.server.max_client_batch_size,
                open_paths=settings.server.api_key_open_paths)
        app.state.loader_thread = threading.Thread(
            target=_start_engine, args=(app, settings, loader, metrics), name="turboserve-loader", daemon=True)
        app.state.loader_thread.start()
        yield
        app.state.draining = True
        # Everything below within what is left of shutdown_timeout_s (from SIGTERM, or from now on Ctrl-C).
        deadline = app.state.shutdown_deadline or time.monotonic() + settings.server.shutdown_timeout_s

        def left() -> float:
            return max(deadline - time.monotonic(), 0.1)

        if grpc_server is not None:  # new calls are refused from here; those admitted finish within the grace
            await grpc_server.stop(left())
        # A model still loading (or profiling its cost model, ~25 s on a CPU) serves nobody: not waited for; its
        # daemon thread ends with the process.
        app.state.loader_thread.join(timeout=0.5)
        if app.state.engine is not None:
            app.state.engine.stop(timeout=left())
            if app.state.engine.cost is not None:
                save_refined(settings, app.state.engine.cost)
        if app.state.reranker is not None:
            app.state.reranker.stop(timeout=left())
            if app.state.reranker.cost is not None:
                save_refined(app.state.reranker.settings, app.state.reranker.cost)
        if app.state.recommender is not None:
            app.state.recommender.close()
        app.state.shared_memory.close()

    app = FastAPI(title="turboserve", version=server.__version__, lifespan=lifespan)
    app.state.engine = None
    app.state.reranker = None  # reranker.path's engine, once loaded
    app.state.load_error = None
    app.state.recommender = None
    app.state.embeddings_enabled = settings.embeddings.enabled
    app.state.draining = False
    app.state.shutdown_deadline = None  # time.monotonic() by which a drain must be over (set by SIGTERM)
    app.state.grpc_port = None  # the bound port, once the gRPC server runs
    app.state.shared_memory = SharedMemoryRegistry(settings.server.shared_memory, settings.server.payload_limit)
    edge_state = {"in_flight": 0, "last_activity": 0.0}

    def begin_drain() -> None:
        """Readiness off and new requests refused (503) from now on; admitted ones carry on."""
        app.state.draining = True
        app.state.shutdown_deadline = time.monotonic() + settings.server.shutdown_timeout_s
        metrics.ready.set(0)
        for engine in (app.state.engine, app.state.reranker):  # no batch is held back for arrivals that will not come
            if engine is not None:
                engine.queue.stop_waiting()

    def busy() -> int:
        """Requests being answered plus sequences queued or running (0 once everything admitted is done)."""
        engines = [e for e in (app.state.engine, app.state.reranker) if e is not None]
        return edge_state["in_flight"] + sum(e.queue.depth for e in engines)

    def abandon() -> int:
        """Fail every queued sequence with a 503 (the server is going away: the drain deadline passed, or a forced
        exit), so its request gets an answer in its API's shape instead of being cut off; returns how many."""
        gone = NotReady("the server is shutting down before this request could run; retry it")
        return sum(e.queue.fail_pending(gone) for e in (app.state.engine, app.state.reranker) if e is not None)

    app.state.begin_drain = begin_drain
    app.state.busy = busy
    app.state.abandon = abandon
    app.state.in_flight = lambda: edge_state["in_flight"]
    app.state.last_activity = lambda: edge_state["last_activity"]  # time.monotonic() a request last came or went
    app.state.metrics = metrics
    app.state.started_at = int(time.time())
    retry_after = str(settings.scheduler.retry_after_s)

    def render(request: Request, kind: ErrorKind, message: str) -> Response:
        status, body = error_body(api_family(request.url.path), kind, message)
        headers = {"Retry-After": retry_after} if kind.status in (429, 503) else None
        return Response(body, status_code=status, headers=headers, media_type="application/json")

    async def domain_error(request: Request, exc: Exception) -> Response:
        return render(request, kind_of(exc), str(exc))

    for cls in KINDS:
        app.add_exception_handler(cls, domain_error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        kind = request.headers.get("content-type", "")
        if request.method == "POST" and not json_media_type(kind):
            # A JSON body route sent something else (curl -d's form encoding, text/plain, no type: FastAPI reads a
            # body as JSON only under a JSON type): say so, as TEI does, rather than "body: not a valid dictionary".
            return render(request, UNSUPPORTED_MEDIA, f"expected a request with Content-Type: application/json, not "
                                                      f"{kind[:60] or 'none'}")
        return render(request, VALIDATION, describe_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return render(request, ErrorKind(exc.status_code, "invalid_request_error", code, "Validation"), str(exc.detail))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(routes_openai.router)
    # TEI and infinity also serve the OpenAI routes without /v1; same handlers, same (OpenAI) error bodies.
    app.add_api_route("/embeddings", routes_openai.create_embeddings, methods=["POST"], include_in_schema=False)
    app.add_api_route("/models", routes_openai.list_models_infinity, methods=["GET"], include_in_schema=False,
                      response_model=routes_openai.InfinityModelList)
    app.add_api_route("/models/{model:path}", routes_openai.retrieve_model, methods=["GET"], include_in_schema=False)
    app.include_router(routes_tei.router)
    app.include_router(routes_rerank.router)
    app.include_router(routes_rerank.v1_router)
    app.include_router(routes_vertex.router)
    app.include_router(routes_vllm.router)
    app.include_router(routes_kserve.router)
    app.include_router(routes_triton.router)
    app.include_router(routes_recommend.router)

    def openapi() -> dict:
        """FastAPI's schema without the 422 it adds to every route with a body: OpenAI and KServe routes
        answer validation errors with 400 (declared by their routers), so a 422 there would be a lie."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, operations in schema.get("paths", {}).items():
                if 422 not in error_responses(api_family(path)):
                    for operation in operations.values():
                        operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    key = settings.server.api_key
    app.add_middleware(HeadAsGet)  # innermost: the edge sees (and logs, counts) the HEAD
    app.add_middleware(EdgeMiddleware, metrics=metrics, payload_limit=settings.server.payload_limit,
                       api_key=key.get_secret_value() if key is not None else None, counters=edge_state,
                       open_paths=settings.server.api_key_open_paths, access_log=settings.server.access_log)
    if settings.server.cors_origins:
        # Outermost (added last): a browser's preflight carries no API key, so CORS answers it before the
        # key check; other responses, a 401 included, get the CORS headers the browser needs to read them.
        app.add_middleware(CORSMiddleware, allow_origins=settings.server.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app
