"""`sbx` command-line entry: one argparse tree, each command group in its own module.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its sub-commands
and sets `func` on them; `func(args)` returns the process exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sandbox.errors import SandboxError

COMMAND_MODULES = (
    "cli.run_cmd",
    "cli.images_cmd",
    "cli.service_cmd",
    "cli.volumes_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sbx", description="Rootless sandbox runner")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SandboxError as exc:
        print(f"sbx: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
