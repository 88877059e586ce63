"""API entrypoint: `sbx api` / `python -m api.serve`. The only place Settings come from env."""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="listen address (default 127.0.0.1 or SBX_API_HOST)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8000 or SBX_API_PORT)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from api.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    settings = Settings.from_env(**overrides)
    try:
        settings.check()
    except ValueError as exc:
        print(f"sbx api: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1:
        uvicorn.run(
            "api.serve:app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=args.workers,
            log_level="warning",
            access_log=False,
        )
    else:
        uvicorn.run(
            create_app(settings), host=settings.host, port=settings.port, log_level="warning", access_log=False
        )
    return 0


def app_from_env():
    """uvicorn factory for multi-process serving: each process builds its own app."""
    from api.app import create_app
    from api.settings import Settings

    return create_app(Settings.from_env())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sbx api", description="Serve the sbx HTTP API")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
