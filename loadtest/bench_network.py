"""What networks and volumes cost per run, interleaved in one process.

Rounds of: a /bin/true run with network none, one with a private network of its own
(job namespace, bridge, veth pair, /etc/hosts), one with egress (slirp4netns plus the
nftables filter; only with --egress, which needs no outside traffic: the run does not
connect anywhere), a bare create_network + remove_network, a job of one busybox service
(`nc -l`) plus a main container that talks to it, and a /bin/true run with a 1 MiB
read-write volume holding N small files. The runtime has warm_spares=0, so every column
pays the same fresh clone; the differences are the cost of the feature. A short gap between
cases keeps one case's teardown (which the helper does after answering) out of the next
case's time. Prints medians.

Run as the unprivileged service user:
  sudo -u sbx /opt/sbx/venv/bin/python -m loadtest.bench_network --rounds 50 --egress
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sandbox.config import RuntimeSettings
from sandbox.jobs import Service, run_job
from sandbox.runner import Runtime
from sandbox.spec import Limits, Rootfs, RunSpec, Verdict, VolumeMount
from sandbox.volumes import VolumeStore

PATH = {"PATH": "/bin:/usr/bin:/sbin:/usr/sbin"}


def busybox_root(workdir: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fixtures.rootfs import build_busybox_rootfs

    root = workdir / "busybox"
    root.mkdir()
    return build_busybox_rootfs(root)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--egress", action="store_true", help="also time egress runs")
    parser.add_argument("--files", type=int, default=100, help="files in the volume")
    parser.add_argument("--gap", type=float, default=0.05,
                        help="seconds between cases, so one case's teardown (done by the helper "
                             "after it answers) is not billed to the next")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rootfs = Rootfs(layers=(str(busybox_root(work)),))
        settings = RuntimeSettings(state_dir=str(work / "state"), warm_spares=0,
                                   egress=args.egress, egress_allow=("192.0.2.0/24",))
        store = VolumeStore.from_settings(settings)
        store.create("bench", "vol", 1 << 20)
        with Runtime(settings) as rt:
            def run(spec: RunSpec, **kw) -> None:
                r = rt.run(spec, rootfs, **kw)
                assert r.verdict is Verdict.OK, (r.verdict, r.stderr, r.message, r.stage)

            def with_volume() -> None:
                with store.attach("bench", [VolumeMount(name="vol", path="/v")]) as binds:
                    run(RunSpec(cmd=["/bin/true"], env=PATH), volumes=binds)

            fill = f"i=0; while [ $i -lt {args.files} ]; do echo $i > /v/f$i; i=$((i+1)); done"
            with store.attach("bench", [VolumeMount(name="vol", path="/v")]) as binds:
                run(RunSpec(cmd=["/bin/sh", "-c", fill], env=PATH), volumes=binds)

            svc = Service(name="svc", rootfs=rootfs, port=9000,
                          spec=RunSpec(cmd=["/bin/sh", "-c",
                                            "while true; do echo x | nc -l -p 9000; done"],
                                       env=PATH, limits=Limits(wall_time=60)))
            setup: list[float] = []

            def job() -> None:
                r = run_job(rt, RunSpec(cmd=["nc", "svc", "9000"], env=PATH, network="private"),
                            rootfs, services=[svc])
                assert r.verdict is Verdict.OK and r.stdout == b"x\n", (r.stderr, r.message)
                setup.append(r.setup_time * 1000)

            def net_only() -> None:
                rt.remove_network(rt.create_network(["a", "b"]).id)

            cases = {
                "none": lambda: run(RunSpec(cmd=["/bin/true"], env=PATH)),
                "private": lambda: run(RunSpec(cmd=["/bin/true"], env=PATH, network="private")),
                "create+remove network": net_only,
                "job: 1 service + main": job,
                f"rw volume ({args.files} files)": with_volume,
            }
            if args.egress:
                cases["egress"] = lambda: run(RunSpec(cmd=["/bin/true"], env=PATH,
                                                      network="egress"))
            for fn in cases.values():  # warm up
                fn()
            setup.clear()
            times: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, fn in cases.items():
                    time.sleep(args.gap)
                    times[name].append(timed(fn))
        base = statistics.median(times["none"])
        print(f"{'case':28} {'median ms':>10} {'+ vs none':>10}   (rounds={args.rounds}, "
              f"busybox /bin/true, warm_spares=0)")
        for name, values in times.items():
            med = statistics.median(values)
            print(f"{name:28} {med:10.2f} {med - base:+10.2f}")
        print(f"{'job setup_time (svc ready)':28} {statistics.median(setup):10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
