"""`turboserve` command line: `turboserve serve [--config FILE] [--host] [--port] [--model PATH]`,
`turboserve profile`, `turboserve import-embeddings --table T --file F`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from pydantic import ValidationError

import server


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turboserve",
        description="Serve transformer embedding models over OpenAI, TEI and KServe v2 HTTP APIs.",
        epilog="Every setting can also come from the environment: TURBOSERVE_<SECTION>__<FIELD>, "
               "e.g. TURBOSERVE_SCHEDULER__MAX_BATCH_TOKENS=8192.")
    parser.add_argument("--version", action="version", version=f"turboserve {server.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--config", help="YAML settings file (see configs/default.yaml)")
    serve.add_argument("--host", help="address to bind (server.host)")
    serve.add_argument("--port", type=int, help="port to bind (server.port)")
    serve.add_argument("--grpc-port", type=int, help="also serve KServe v2 gRPC on this port (server.grpc_port; Triton's is 8001)")
    serve.add_argument("--model", help="Hugging Face model folder (model.path); default: embedded all-MiniLM-L6-v2")
    serve.add_argument("--model-name", help="served model name (model.name)")
    serve.add_argument("--reranker", help="a cross-encoder folder served beside the model for /rerank and the like (reranker.path)")
    serve.add_argument("--device", help="torch device (model.device)")
    serve.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                       help="compute dtype (model.dtype): float32 or bfloat16 on a CPU, float16 or bfloat16 on CUDA")
    serve.add_argument("--api-key", help="require this bearer token (server.api_key); visible in ps, prefer --api-key-file")
    serve.add_argument("--api-key-file", help="read the bearer token from this file (server.api_key_file)")
    serve.add_argument("--log-format", choices=["text", "json"], help="text, or one JSON object per line (server.log_format)")
    serve.add_argument("--access-log", action="store_true", default=None, help="one log line per request (server.access_log)")
    prof = sub.add_parser("profile", help="measure the batch cost model for the configured model and device, and save it")
    prof.add_argument("--config", help="YAML settings file")
    prof.add_argument("--model", help="Hugging Face model folder (model.path)")
    prof.add_argument("--device", help="torch device (model.device)")
    prof.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype (model.dtype)")
    prof.add_argument("--runs", type=int, help="timed runs per cell (scheduler.profile_runs)")
    prof.add_argument("--max-tokens", type=int, help="largest batch measured, in tokens (scheduler.profile_max_tokens)")
    imp = sub.add_parser("import-embeddings", help="import an embedding table into the persistent tier (RocksDB)",
                         description="Import one table's rows from .npy, .safetensors or .csv into the RocksDB store of "
                                     "the embedding parameter server (embeddings.path). Stop a server using it first.")
    imp.add_argument("--table", required=True, help="table name (a DLRM's config names its tables)")
    imp.add_argument("--file", required=True, help="the rows: .npy [rows, dim], .safetensors, or .csv")
    imp.add_argument("--format", choices=["auto", "npy", "safetensors", "csv"], default="auto",
                     help="file format (default: from the suffix)")
    imp.add_argument("--tensor", help="safetensors: the tensor to import (default: the one named like the table, or the only one)")
    imp.add_argument("--csv-layout", choices=["keyed", "ordered"], default="keyed",
                     help="csv: 'keyed' lines are key,v0,v1,...; 'ordered' lines are v0,v1,... and line i is key i")
    imp.add_argument("--default-vector", help="vector answered for keys the table lacks: one number or dim comma-separated "
                                              "numbers (default zeros; only when the table is created)")
    imp.add_argument("--path", help="RocksDB directory (embeddings.path)")
    imp.add_argument("--config", help="YAML settings file (for embeddings.path)")
    imp.add_argument("--chunk-rows", type=int, default=65536, help="rows per atomic write (default 65536)")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags = {"host": ("server", "host"), "port": ("server", "port"), "grpc_port": ("server", "grpc_port"), "model": ("model", "path"),
             "model_name": ("model", "name"), "reranker": ("reranker", "path"), "device": ("model", "device"), "dtype": ("model", "dtype"), "api_key": ("server", "api_key"),
             "api_key_file": ("server", "api_key_file"), "log_format": ("server", "log_format"),
             "access_log": ("server", "access_log"),
             "runs": ("scheduler", "profile_runs"), "max_tokens": ("scheduler", "profile_max_tokens")}
    pairs = {place: getattr(args, flag, None) for flag, place in flags.items()}
    out: dict[str, dict[str, Any]] = {}
    for (section, key), value in pairs.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(x) for x in err["loc"]) or "settings"
        given = err.get("input")
        # A section-level check gets the whole section as input: never echo it (it may hold the API key).
        got = f" (got {given!r})" if err["loc"] and not isinstance(given, dict) and "api_key" not in field else ""
        lines.append(f"  {field}: {err['msg']}{got}" if err["loc"] else f"  {err['msg']}")
    return "invalid settings:\n" + "\n".join(lines)


def _settings(args: argparse.Namespace):
    """Settings from the flags, or None after printing why they are invalid."""
    from configs.settings import PathNotAllowed, check_model_dirs, load_settings, unknown_env  # here: keep --help fast
    from models.config import ModelFolderError, default_model_path
    from models.folder import read_model_folder, token_classifier

    for name in unknown_env():
        print(f"turboserve: warning: {name} names no setting; ignored (see README, Configuration)", file=sys.stderr)

    try:
        settings = load_settings(args.config, _overrides(args))
    except ValidationError as exc:
        print(f"turboserve: {_explain(exc)}", file=sys.stderr)
        return None
    except ValueError as exc:
        print(f"turboserve: {exc}", file=sys.stderr)
        return None
    try:  # refuse a model outside server.model_dirs before reading anything from it
        check_model_dirs(settings)
    except PathNotAllowed as exc:
        print(f"turboserve: {exc}", file=sys.stderr)
        return None
    from models.checks import check_model_settings

    # Everything the model folder or this machine decides, refused now, not after the port is open.
    for section, model in (("model", settings.model), ("reranker", settings.reranker)):
        if model is None:
            continue
        try:
            folder = read_model_folder(model.path or default_model_path())
        except ModelFolderError as exc:
            print(f"turboserve: {section}.path: {exc}", file=sys.stderr)
            return None
        try:
            folder = token_classifier(folder, model.classifier_from_token, section)
            if section == "reranker" and folder.head is None:
                raise ModelFolderError(f"{section}.path: {model.path} is not a cross-encoder or classifier (its "
                                       "config.json names no *ForSequenceClassification architecture; a causal LM "
                                       "re-ranker needs reranker.classifier_from_token)")
            check_model_settings(folder, model.device, model.dtype, model.max_input_length, model.pooling,
                                 model.default_prompt_name, section, model.matryoshka_dimensions)
        except ModelFolderError as exc:
            print(f"turboserve: {exc}", file=sys.stderr)
            return None
    if settings.reranker is not None:  # one name, one model: /v1/models and KServe paths would hold two
        from models.runtime import served_name  # noqa: PLC0415

        name = served_name(settings.reranker.path, settings.reranker.name)
        if name == served_name(settings.model.path, settings.model.name):
            print(f"turboserve: reranker.name: the re-ranker would be served as {name!r}, the model's name too; give "
                  "them different names (reranker.name or model.name)", file=sys.stderr)
            return None
    return settings


def profile(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return 2
    from server.app import default_loader, warm_up
    from server.profiling import build_cost_model

    settings = settings.model_copy(update={"scheduler": settings.scheduler.model_copy(update={"profile": "always"})})
    embedder, tokenizer, info = default_loader(settings)()
    warm_up(embedder, tokenizer)
    started = time.time()
    cost, _ = build_cost_model(settings, embedder, info, progress=True)
    print(f"{'n':>4} {'length':>6} {'tokens':>7} {'measured ms':>12} {'predicted ms':>13} {'error':>7}")
    for c in cost.cells:
        predicted = cost.predict_lengths([c.length] * c.n)
        print(f"{c.n:>4} {c.length:>6} {c.tokens:>7} {c.seconds * 1000:>12.2f} {predicted * 1000:>13.2f} "
              f"{(predicted - c.seconds) / c.seconds:>+7.1%}")
    coef = cost.summary()["coefficients_seconds"]
    print("fit: " + ", ".join(f"{k} {v * 1e3:.4g} ms" for k, v in coef.items()))
    if settings.scheduler.cost_model_dir:
        from scheduler.profiler import cache_path
        from server.profiling import cost_key

        path = cache_path(settings.scheduler.cost_model_dir, cost_key(settings, info))
        # An earlier profile's file is kept until this one is saved: only a file written now is this one.
        saved = path.exists() and path.stat().st_mtime >= started - 1
        print(f"saved to {path}" if saved else f"not saved to {path} (see the warning above)")
    return 0


def _bind(host: str, port: int, what: str):
    """Sockets listening on `host:port`, every address the host resolves to (one for port 0), bound as asyncio binds
    for uvicorn (SO_REUSEADDR; IPv6 sockets IPv6-only); or why they cannot be (a host that does not resolve, a port
    in use) as a string. Done before the model loads: uvicorn, given these sockets, never binds after start-up (a
    port taken meanwhile made it exit with the model still loading, and the process abort)."""
    import socket

    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"server.host {host!r} does not resolve: {exc.strerror}"
    sockets: list[socket.socket] = []
    for family, kind, proto, _, address in list(dict.fromkeys(found))[: 1 if port == 0 else None]:
        sock = socket.socket(family, kind, proto)
        sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
            sock.listen(2048)  # uvicorn's backlog; listening holds the port (a bound socket alone would share it)
        except OSError as exc:
            _close(sockets)
            return f"cannot listen on {host}:{port} ({what}): {exc.strerror}"
    return sockets


def _close(sockets) -> None:
    for sock in sockets:
        sock.close()


def _cannot_listen(host: str, port: int | None, what: str) -> str | None:
    """Why `host:port` cannot be listened on, or None (port 0 or None: nothing to check); the probes are let go."""
    if not port:
        return None
    bound = _bind(host, port, what)
    if isinstance(bound, str):
        return bound
    _close(bound)
    return None


def serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return 2
    s = settings.server
    from models.config import ModelFolderError
    from server.recommend import check_recommender

    try:  # the DLRM and the embedding store, refused now rather than leaving a server unready for good
        check_recommender(settings)
    except ValueError as exc:  # ModelFolderError (a ValueError) is the DLRM folder's
        where = "recommend.model_path: " if isinstance(exc, ModelFolderError) else ""
        print(f"turboserve: {where}{exc}", file=sys.stderr)
        return 2
    http_sockets = _bind(s.host, s.port, "server.port")  # held from now on, and served by uvicorn
    problem = http_sockets if isinstance(http_sockets, str) else _cannot_listen(s.host, s.grpc_port, "server.grpc_port")
    if problem:
        if not isinstance(http_sockets, str):
            _close(http_sockets)
        print(f"turboserve: {problem}", file=sys.stderr)
        return 2

    import uvicorn

    from server.app import create_app
    from server.drain import DrainingServer
    from server.logs import configure_logging

    configure_logging(s.log_level, s.log_format, s.access_log)
    import logging  # noqa: PLC0415
    import socket  # noqa: PLC0415

    for sock in http_sockets:  # uvicorn, handed the sockets, does not say where it listens: as it would have
        host, port = sock.getsockname()[:2]
        logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                                                f"[{host}]" if sock.family == socket.AF_INET6 else host, port)
    app = create_app(settings)
    # log_config=None keeps the handlers configured above; uvicorn's own access line stays off, the access
    # line is EdgeMiddleware's (it has the request id and the timings).
    from server.http_protocol import GuardedHttpToolsProtocol

    config = uvicorn.Config(app, host=s.host, port=s.port, log_level=s.log_level, log_config=None, access_log=False,
                            timeout_graceful_shutdown=s.shutdown_timeout_s, http=GuardedHttpToolsProtocol)
    status = 0
    server = DrainingServer(config, app.state.begin_drain, app.state.busy, s.shutdown_timeout_s,
                            last_activity=app.state.last_activity, abandon=app.state.abandon, in_flight=app.state.in_flight)
    try:
        server.run(sockets=http_sockets)
        status = 130 if server.interrupted else 0  # Ctrl-C with SIGINT inherited as ignored: no re-raise came
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: the shell's status, not a traceback
        status = 130
    except SystemExit as exc:  # uvicorn's exit on a failed start-up: past the loader's thread, as any exit
        status = exc.code if isinstance(exc.code, int) else 1
    _exit_past_running_work(app, status)
    return status


def _exit_past_running_work(app, status: int) -> None:
    """Exit now if a batch is still running (the shutdown deadline passed first) or the model is still loading:
    the interpreter's normal exit would tear torch's thread pool down under them and abort (SIGABRT, "terminate
    called without an active exception"). Their requests were already answered (503)."""
    import logging  # noqa: PLC0415
    import os  # noqa: PLC0415

    state = app.state
    running = [e for e in (state.engine, state.reranker) if e is not None and e.healthy]
    loading = getattr(state, "loader_thread", None) is not None and state.loader_thread.is_alive()
    if running or loading:
        logging.getLogger(__name__).warning("exiting with %s unfinished", "a batch" if running else "the model's loading")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def import_embeddings(args: argparse.Namespace) -> int:
    from configs.settings import load_settings
    from server.import_tables import ImportFailed, import_table

    overrides = {"embeddings": {"path": args.path}} if args.path else {}
    try:
        settings = load_settings(args.config, overrides)
    except ValidationError as exc:
        print(f"turboserve: {_explain(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"turboserve: {exc}", file=sys.stderr)
        return 2
    if args.chunk_rows < 1:
        print(f"turboserve: --chunk-rows {args.chunk_rows} must be >= 1", file=sys.stderr)
        return 2
    try:
        summary = import_table(settings.embeddings.path, args.table, args.file, args.format, args.tensor, args.csv_layout,
                               args.default_vector, args.chunk_rows, progress=not args.no_progress)
    except ImportFailed as exc:
        print(f"turboserve: {exc}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"serve": serve, "profile": profile, "import-embeddings": import_embeddings}[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C outside uvicorn (imports, the model folder's checks, profile, an import)
        print("turboserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
