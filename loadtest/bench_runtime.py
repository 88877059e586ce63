"""Container start cost: sbx's Python API against bubblewrap, interleaved in one run.

For each workload (/bin/true, python3 -c pass) it alternates one sbx run (cgroup limits, as
deployed; with --with-rlimit also one in the rlimit fallback) and one
`bwrap --unshare-all --die-with-parent --new-session` run launched from Python with
subprocess, on the same root filesystem, and prints medians and the ratios to bwrap. bwrap
enforces no limits; the rlimit column shows what the memory cgroup costs the payload itself
(charging every page it faults in). A third column also runs one runtime's after-reply
clean-up against the other's run, so compare it with care. With
--caller-mb the calling process first grows by that many MB (a worker's size), to show the
helper keeps the per-run cost flat. With --memory-runs it then does that many more sbx runs
and prints the RSS of the caller, the helper and its cloner along the way (all must stay
flat).

Run as the unprivileged service user: sudo -u sbx /opt/sbx/venv/bin/python -m loadtest.bench_runtime
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sandbox.config import RuntimeSettings
from sandbox.runner import Runtime
from sandbox.spec import Limits, Rootfs, RunSpec, Verdict

WORKLOADS = {"true": ["/bin/true"], "python": ["python3", "-c", "pass"]}
PATH = {"PATH": "/usr/bin:/bin"}


def python_rootfs(workdir: Path) -> Path:
    """The test suite's Debian python rootfs (cached tar from mmdebstrap), unpacked."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fixtures.rootfs import add_base_files, cached_python_rootfs_tar, extract_rootfs_tar

    root = extract_rootfs_tar(cached_python_rootfs_tar(), workdir / "python-rootfs")
    add_base_files(root)
    true = root / "bin/true"  # the recipe has no coreutils: busybox's applet stands in
    if not os.path.lexists(true):
        true.symlink_to("busybox")
    return root


def bwrap_cmd(rootfs: Path, argv: list[str]) -> list[str]:
    return ["bwrap", "--unshare-all", "--die-with-parent", "--new-session",
            "--ro-bind", str(rootfs), "/", "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/tmp", "--clearenv", "--setenv", "PATH", PATH["PATH"], *argv]


def rss_kb(pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="runs per tool and workload")
    ap.add_argument("--caller-mb", type=int, default=0, help="grow the caller first (MB)")
    ap.add_argument("--memory-runs", type=int, default=0, help="extra sbx runs for RSS")
    ap.add_argument("--rootfs", help="a python rootfs dir (default: the test suite's)")
    ap.add_argument("--spares", type=int, default=1, help="warm_spares setting of the runtime")
    ap.add_argument("--with-rlimit", action="store_true",
                    help="also time sbx in the rlimit fallback (a third interleaved column)")
    args = ap.parse_args()

    ballast = bytearray(args.caller_mb << 20)
    for i in range(0, len(ballast), 4096):  # touch it: a real worker's memory is resident
        ballast[i] = 1
    with tempfile.TemporaryDirectory(prefix="sbx-bench-") as tmp:
        rootfs = Path(args.rootfs) if args.rootfs else python_rootfs(Path(tmp))
        settings = RuntimeSettings(state_dir=os.path.join(tmp, "state"), warm_spares=args.spares)
        rlimit_settings = RuntimeSettings(state_dir=os.path.join(tmp, "state-rlimit"),
                                          cgroup_mode="none", warm_spares=args.spares)
        with Runtime(settings) as rt, Runtime(rlimit_settings) as rt_rlimit:
            layers = Rootfs(layers=(str(rootfs),))
            limits = Limits(wall_time=30, cpu_time=30)
            print(f"caller RSS {rss_kb() // 1024} MB, limits mode {rt.health()['limits_mode']}, "
                  f"{args.runs} runs per tool and workload, interleaved sbx / sbx-rlimit / bwrap")
            for name, argv in WORKLOADS.items():
                spec = RunSpec(cmd=argv, env=PATH, limits=limits)
                for _ in range(5):  # warm: page cache, helpers
                    rt.run(spec, layers)
                    rt_rlimit.run(spec, layers)
                    subprocess.run(bwrap_cmd(rootfs, argv), check=True)
                runtimes = [("sbx", rt)] + ([("sbx-rlimit", rt_rlimit)] if args.with_rlimit else [])
                times: dict[str, list[float]] = {label: [] for label, _ in runtimes}
                times["bwrap"] = []
                for _ in range(args.runs):
                    for label, runtime in runtimes:
                        t = time.perf_counter()
                        result = runtime.run(spec, layers)
                        times[label].append(time.perf_counter() - t)
                        if result.verdict is not Verdict.OK:
                            raise SystemExit(f"sbx run failed: {result}")
                    t = time.perf_counter()
                    subprocess.run(bwrap_cmd(rootfs, argv), check=True)
                    times["bwrap"].append(time.perf_counter() - t)
                med = {k: statistics.median(v) for k, v in times.items()}
                print(f"{name:7s} " + "   ".join(f"{k} {v * 1000:6.2f} ms" for k, v in med.items())
                      + "".join(f"   ratio {k}/bwrap {v / med['bwrap']:.2f}"
                                for k, v in med.items() if k != "bwrap"))
            if args.memory_runs:
                spec = RunSpec(cmd=["/bin/true"], env=PATH)
                marks = {}
                for i in range(1, args.memory_runs + 1):
                    rt.run(spec, layers)
                    if i in (10, args.memory_runs // 10, args.memory_runs // 2, args.memory_runs):
                        cloner = rt.health().get("cloner_pid", "")
                        marks[i] = (rss_kb(), rss_kb(str(rt.helper_pid)),
                                    rss_kb(cloner) if cloner else 0)
                print("RSS in KB (caller, helper, cloner) after n runs: "
                      + ", ".join(f"{n}: {c}, {h}, {k}" for n, (c, h, k)
                                  in sorted(marks.items())))
    del ballast
    return 0


if __name__ == "__main__":
    sys.exit(main())
