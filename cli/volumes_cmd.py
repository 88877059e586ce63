"""`sbx volumes create|ls|inspect|rm`: named volumes on this machine, no service needed.

Volumes belong to a tenant: `--tenant` (or $SBX_TENANT), `local` by default. The service's
tenants are the names its API keys map to, so `--tenant NAME` here shows what that tenant
sees through the API when the service runs on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import msgspec

from sandbox.config import RuntimeSettings

DEFAULT_TENANT = "local"


def tenant_of(args: argparse.Namespace) -> str:
    return args.tenant or os.environ.get("SBX_TENANT") or DEFAULT_TENANT


def add_tenant_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", help=f"owner of the volumes (default $SBX_TENANT or "
                                         f"{DEFAULT_TENANT!r})")


def _store():
    from sandbox.volumes import VolumeStore

    return VolumeStore.from_settings(RuntimeSettings.from_env())


def _size(text: str) -> int:
    from cli.run_cmd import parse_size

    return parse_size(text)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("volumes", help="named volumes that outlive runs",
                              description=__doc__)
    sub = p.add_subparsers(dest="volumes_command", required=True)
    c = sub.add_parser("create", help="create a volume with a size quota")
    c.add_argument("name")
    c.add_argument("--size", type=_size, required=True, help="quota: bytes, or 64M, 1G")
    ls = sub.add_parser("ls", help="list volumes")
    ls.add_argument("--json", action="store_true")
    i = sub.add_parser("inspect", help="show a volume and the bytes it uses")
    i.add_argument("name")
    rm = sub.add_parser("rm", help="delete volumes (refused while a run uses one)")
    rm.add_argument("names", nargs="+")
    for parser in (c, ls, i, rm):
        add_tenant_option(parser)
    c.set_defaults(func=_create)
    ls.set_defaults(func=_ls)
    i.set_defaults(func=_inspect)
    rm.set_defaults(func=_rm)


def _json(obj) -> None:
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")


def _create(args: argparse.Namespace) -> int:
    _json(_store().create(tenant_of(args), args.name, args.size))
    return 0


def _ls(args: argparse.Namespace) -> int:
    volumes = _store().list(tenant_of(args))
    if args.json:
        _json(volumes)
        return 0
    print(f"{'NAME':32} {'SIZE':>12} {'USED':>12}  UPDATED")
    for v in volumes:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.updated_at))
        print(f"{v.name:32} {v.size:>12} {v.used:>12}  {when}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    info = _store().inspect(tenant_of(args), args.name)
    print(json.dumps(msgspec.to_builtins(info), indent=2))
    return 0


def _rm(args: argparse.Namespace) -> int:
    store = _store()
    for name in args.names:
        store.delete(tenant_of(args), name)
        print(name)
    return 0
