"""`turboserve` command line: `turboserve serve [--config FILE] [--host] [--port] [--model PATH]`."""

from __future__ import annotations

import argparse
import logging
import sys
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
    serve.add_argument("--model", help="Hugging Face model folder (model.path); default: embedded all-MiniLM-L6-v2")
    serve.add_argument("--model-name", help="served model name (model.name)")
    serve.add_argument("--device", help="torch device (model.device)")
    serve.add_argument("--api-key", help="require this bearer token (server.api_key)")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {("server", "host"): args.host, ("server", "port"): args.port, ("model", "path"): args.model,
             ("model", "name"): args.model_name, ("model", "device"): args.device, ("server", "api_key"): args.api_key}
    out: dict[str, dict[str, Any]] = {}
    for (section, key), value in pairs.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(x) for x in err["loc"]) or "settings"
        lines.append(f"  {field}: {err['msg']} (got {err.get('input')!r})" if err["loc"] else f"  {err['msg']}")
    return "invalid settings:\n" + "\n".join(lines)


def serve(args: argparse.Namespace) -> int:
    from configs.settings import load_settings  # noqa: PLC0415 - keep --help fast
    from models.config import ModelFolderError, default_model_path, read_model_folder  # noqa: PLC0415

    try:
        settings = load_settings(args.config, _overrides(args))
    except ValidationError as exc:
        print(f"turboserve: {_explain(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"turboserve: {exc}", file=sys.stderr)
        return 2
    try:  # refuse a bad model folder now, not after the port is open
        read_model_folder(settings.model.path or default_model_path())
    except ModelFolderError as exc:
        print(f"turboserve: model.path: {exc}", file=sys.stderr)
        return 2

    import uvicorn  # noqa: PLC0415

    from server.app import create_app  # noqa: PLC0415

    logging.basicConfig(level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=settings.server.host, port=settings.server.port, log_level=settings.server.log_level,
                timeout_graceful_shutdown=30)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
