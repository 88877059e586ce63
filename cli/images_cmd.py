"""`sbx images ...`: pull, ls, inspect, rm, prune, build, push.

Progress goes to stderr: a redrawn line per blob on a terminal, plain lines otherwise (one per
state change, so logs stay readable).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from sandbox.config import RuntimeSettings


class ProgressPrinter:
    """Turns sandbox.oci ProgressEvents into terminal bars or plain log lines."""

    def __init__(self, stream: TextIO = sys.stderr, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.last: dict[tuple[str, str], int] = {}

    def __call__(self, ev) -> None:
        key = (ev.action, ev.item)
        if self.tty and ev.action in ("download", "upload") and ev.total:
            width = 30
            filled = int(width * ev.done / ev.total)
            bar = "#" * filled + "-" * (width - filled)
            end = "\n" if ev.done >= ev.total else ""
            self.stream.write(f"\r{ev.action:8} {ev.item} [{bar}] {_mb(ev.done)}/{_mb(ev.total)}{end}")
            self.stream.flush()
            return
        if ev.action in ("download", "upload", "unpack"):
            started = key in self.last
            finished = ev.total and ev.done >= ev.total
            if started and not finished:
                return
            self.last[key] = ev.done
            state = "done" if finished else "start"
            self.stream.write(f"{ev.action} {ev.item} {state} {_mb(ev.done)}/{_mb(ev.total)}\n")
        elif ev.action == "step":
            self.stream.write(f"{ev.item}\n")
        else:
            suffix = f" {_mb(ev.total)}" if ev.total else ""
            self.stream.write(f"{ev.action} {ev.item}{suffix}\n")
        self.stream.flush()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}MB"


def _settings() -> RuntimeSettings:
    return RuntimeSettings.from_env()


def _pull(args) -> int:
    from sandbox.oci.pull import Puller
    puller = Puller(_settings(), progress=ProgressPrinter())
    for ref in args.refs:
        img = puller.pull(ref)
        print(f"{img.reference} {img.digest}")
    return 0


def _ls(args) -> int:
    from sandbox.oci.store import ImageStore
    store = ImageStore(_settings())
    records = store.list_refs()
    if args.json:
        print(json.dumps([{"reference": r.reference, "digest": r.digest,
                           "size": store.image_size(r)} for r in records], indent=2))
        return 0
    print(f"{'REFERENCE':60} {'DIGEST':19} {'SIZE':>10}")
    for r in records:
        print(f"{r.reference:60} {r.digest[7:19]:19} {_mb(store.image_size(r)):>10}")
    return 0


def _find(store, text: str):
    from sandbox.errors import ImageNotFound
    rec = store.lookup(text)
    if rec is None:
        raise ImageNotFound(f"image {text} is not in the local store", field="image")
    return rec


def _inspect(args) -> int:
    from sandbox.oci.store import ImageStore
    store = ImageStore(_settings())
    print(json.dumps([store.inspect(_find(store, r)) for r in args.refs], indent=2))
    return 0


def _rm(args) -> int:
    from sandbox.oci.store import ImageStore
    store = ImageStore(_settings())
    for text in args.refs:
        rec = _find(store, text)
        store.remove_ref(rec.reference)
        print(f"removed {rec.reference}")
    if args.prune:
        return _prune(args)
    return 0


def _prune(args) -> int:
    from sandbox.oci.store import ImageStore
    report = ImageStore(_settings()).prune(keep_build_cache=not getattr(args, "all", False))
    print(f"pruned {report.blobs} blobs, {report.layers} layers, {report.tmp} leftovers, "
          f"{_mb(report.bytes)}")
    return 0


def _push(args) -> int:
    from sandbox.oci.pull import Puller
    puller = Puller(_settings(), progress=ProgressPrinter())
    digest = puller.push(args.ref, args.dest)
    print(f"{args.dest or args.ref} {digest}")
    return 0


def _build(args) -> int:
    from sandbox.oci.build import Builder
    settings = _settings()
    builder = Builder(settings, progress=ProgressPrinter())
    build_args = dict(a.split("=", 1) for a in args.build_arg)
    result = builder.build(args.context, tag=args.tag, build_args=build_args,
                           run_test=not args.no_test)
    print(f"{result.reference} {result.digest} ({result.built} built, {result.cached} cached)")
    if args.push:
        from sandbox.oci.pull import Puller
        digest = Puller(settings, store=builder.store, progress=ProgressPrinter()).push(
            result.reference)
        print(f"pushed {result.reference} {digest}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    images = subparsers.add_parser("images", help="pull, list, build and push OCI images")
    sub = images.add_subparsers(dest="images_command", required=True)

    p = sub.add_parser("pull", help="pull images from their registry into the local store")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.set_defaults(func=_pull)

    p = sub.add_parser("ls", help="list local images")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_ls)

    p = sub.add_parser("inspect", help="show manifest, config and layers of local images")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("rm", help="remove local image references (content goes with prune)")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.add_argument("--prune", action="store_true", help="prune unused content afterwards")
    p.set_defaults(func=_rm)

    p = sub.add_parser("prune", help="delete blobs and layers no image uses")
    p.add_argument("--all", action="store_true", help="also forget the build cache")
    p.set_defaults(func=_prune)

    p = sub.add_parser("push", help="push a local image to a registry")
    p.add_argument("ref", metavar="REF")
    p.add_argument("dest", nargs="?", metavar="DEST", help="another reference to push as")
    p.set_defaults(func=_push)

    p = sub.add_parser("build", help="build an image from images/NAME (Dockerfile subset)")
    p.add_argument("context", metavar="DIR")
    p.add_argument("--tag", "-t", help="reference to store (and push) the image as")
    p.add_argument("--push", action="store_true", help="push to the registry after building")
    p.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--no-test", action="store_true", help="skip the image's test command")
    p.set_defaults(func=_build)
