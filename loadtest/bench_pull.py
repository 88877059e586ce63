"""Benchmark: cold pull + unpack of an image from a local registry, sbx vs skopeo + umoci.

A (sbx):   Puller.pull(ref) into an empty store: manifest, config, verified blob downloads, safe
           unpack of every layer (whiteouts to overlay xattrs).
B (peer):  `skopeo copy docker://ref oci:DIR:tag` then `umoci unpack --rootless` of the same
           image: the same work done by two widely used tools.

Runs interleave A B A B ... (the machine is shared and noisy), each from a cold, empty
directory; medians and the ratio sbx/peer are printed (target <= 1.0). The image is built from
images/NAME with the sbx builder and pushed first unless --ref names one already in the registry;
without --registry a private docker-registry is started on a free loopback port.

    python -m loadtest.bench_pull [--image python] [--rounds 5] [--registry HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox.config import RuntimeSettings  # noqa: E402
from sandbox.oci.build import Builder  # noqa: E402
from sandbox.oci.pull import Puller  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = {"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
              "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
              "http": {"addr": f"127.0.0.1:{port}", "secret": "bench"}}
    (root / "config.yml").write_text(json.dumps(config))
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host = f"127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://{host}/v2/", timeout=1)
            return proc, host
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("docker-registry did not start")


def rm(path: Path) -> None:
    if path.exists():
        subprocess.run(["chmod", "-R", "u+rwx", str(path)], check=False)
        shutil.rmtree(path)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def run_sbx(ref: str, registry: str, work: Path) -> float:
    settings = RuntimeSettings(state_dir=str(work), registry=registry,
                               insecure_registries=(registry,))
    start = time.perf_counter()
    Puller(settings).pull(ref)
    return time.perf_counter() - start


def run_peer(ref: str, work: Path) -> float:
    work.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
                    f"oci:{work / 'layout'}:img"], check=True)
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{work / 'layout'}:img",
                    str(work / "bundle")], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="python", help="definition under images/ to build")
    ap.add_argument("--ref", help="image already in the registry (skips the build)")
    ap.add_argument("--registry", help="HOST:PORT of a running registry (default: start one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--build-state", default=os.path.expanduser("~/.cache/sbx-bench-build"),
                    help="builder state kept between runs so the image is built once")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sbx-bench-"))
    proc = None
    try:
        registry = args.registry
        if registry is None:
            (tmp / "registry").mkdir()
            proc, registry = start_registry(tmp / "registry")
        ref = args.ref
        if ref is None:
            settings = RuntimeSettings(state_dir=args.build_state, registry=registry,
                                       insecure_registries=(registry,))
            builder = Builder(settings)
            result = builder.build(str(REPO / "images" / args.image),
                                   tag=f"{registry}/bench/{args.image}:latest")
            Puller(settings, builder.store).push(result.reference)
            ref = result.reference
        # one untimed warm-up of each side (page cache, registry caches)
        run_sbx(ref, registry, tmp / "warm-a")
        run_peer(ref, tmp / "warm-b")
        layers = Puller(RuntimeSettings(state_dir=str(tmp / "warm-a"), registry=registry,
                                        insecure_registries=(registry,))).store
        rec = layers.get_ref(ref)
        manifest = layers.manifest(rec.digest)
        compressed = sum(d.size for d in manifest.layers)
        unpacked = du(tmp / "warm-a" / "images" / "layers")
        rm(tmp / "warm-a")
        rm(tmp / "warm-b")

        a_times, b_times = [], []
        for i in range(args.rounds):
            a_times.append(run_sbx(ref, registry, tmp / f"a{i}"))
            rm(tmp / f"a{i}")
            b_times.append(run_peer(ref, tmp / f"b{i}"))
            rm(tmp / f"b{i}")
            print(f"round {i + 1}: sbx {a_times[-1]:.3f}s  skopeo+umoci {b_times[-1]:.3f}s",
                  flush=True)
        a, b = statistics.median(a_times), statistics.median(b_times)
        print(f"image: {ref} ({len(manifest.layers)} layers, {compressed / 1e6:.1f} MB "
              f"compressed, {unpacked / 1e6:.1f} MB unpacked), registry on loopback, "
              f"{args.rounds} interleaved cold rounds, {os.cpu_count()} CPUs")
        print(f"sbx pull+unpack        median {a:.3f}s  (min {min(a_times):.3f}s)")
        print(f"skopeo copy+umoci unpack median {b:.3f}s  (min {min(b_times):.3f}s)")
        print(f"ratio sbx/peer = {a / b:.2f} (target <= 1.0)")
        return 0 if a <= b else 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        rm(tmp)


if __name__ == "__main__":
    sys.exit(main())
