"""Every verdict of the runtime, produced by real programs in real rootless containers."""

from __future__ import annotations

import signal

import pytest

from sandbox.spec import MiB, Limits, RunSpec, Verdict

pytestmark = pytest.mark.rootless

PATH = {"PATH": "/usr/local/bin:/usr/bin:/bin"}


def sh(script: str, **kw) -> RunSpec:
    return RunSpec(cmd=["/bin/sh", "-c", script], env=PATH, **kw)


def py(code: str, **kw) -> RunSpec:
    return RunSpec(cmd=["python3", "-c", code], env=PATH, **kw)


def test_ok_captures_stdout_stderr_and_accounts(runtime, busybox):
    r = runtime.run(sh("echo hello; echo oops >&2"), busybox)
    assert r.verdict is Verdict.OK
    assert (r.exit_code, r.signal) == (0, None)
    assert r.stdout == b"hello\n" and r.stderr == b"oops\n"
    assert 0 < r.wall_time < 5 and r.cpu_time >= 0 and r.memory > 0


def test_stdin_is_delivered(runtime, busybox):
    data = bytes(range(256)) * 1000  # larger than a pipe buffer
    r = runtime.run(RunSpec(cmd=["cat"], env=PATH, stdin=data), busybox)
    assert r.verdict is Verdict.OK and r.stdout == data


def test_nonzero_exit_code(runtime, busybox):
    r = runtime.run(sh("exit 3"), busybox)
    assert r.verdict is Verdict.NONZERO_EXIT and r.exit_code == 3 and r.signal is None


def test_missing_command_is_127_with_message(runtime, busybox):
    r = runtime.run(RunSpec(cmd=["no-such-program"], env=PATH), busybox)
    assert r.verdict is Verdict.NONZERO_EXIT and r.exit_code == 127
    assert b"no-such-program" in r.stderr


def test_self_sigsegv_is_signaled(runtime, python):
    r = runtime.run(py("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"), python)
    assert r.verdict is Verdict.SIGNALED and r.signal == signal.SIGSEGV and r.exit_code is None


def test_wall_time_limit(runtime, busybox):
    r = runtime.run(sh("sleep 30", limits=Limits(wall_time=0.5)), busybox)
    assert r.verdict is Verdict.WALL_TIME_LIMIT
    assert 0.5 <= r.wall_time < 3


@pytest.mark.hostile
def test_cpu_limit_counts_all_processes(runtime, busybox):
    """Three spinning processes on two cores: the run's CPU total is what is limited."""
    script = "for i in 1 2 3; do (while :; do :; done) & done; wait"
    r = runtime.run(sh(script, limits=Limits(cpu_time=1.0, wall_time=10)), busybox)
    assert r.verdict is Verdict.TIME_LIMIT
    # Killed when the three together reached the limit: a per-process limit alone would have
    # let each of them use a second (3 s in all) before anything stopped them.
    assert 1.0 <= r.cpu_time < 2.0


def test_sigxcpu_maps_to_time_limit(rlimit_runtime, busybox):
    r = rlimit_runtime.run(sh("while :; do :; done", limits=Limits(cpu_time=1, wall_time=10)),
                           busybox)
    assert r.verdict is Verdict.TIME_LIMIT
    assert r.signal in (signal.SIGXCPU, signal.SIGKILL)
    assert r.limits_mode == "rlimit"


@pytest.mark.hostile
def test_memory_bomb_is_memory_limit(runtime, python):
    code = "a = []\nwhile True: a.append(bytearray(1 << 20))"
    r = runtime.run(py(code, limits=Limits(memory=64 * MiB, wall_time=20)), python)
    assert r.verdict is Verdict.MEMORY_LIMIT
    assert r.memory >= 48 * MiB


@pytest.mark.hostile
def test_memory_bomb_rlimit_mode(rlimit_runtime, python):
    code = "a = []\nwhile True: a.append(bytearray(1 << 20))"
    r = rlimit_runtime.run(py(code, limits=Limits(memory=64 * MiB, wall_time=20)), python)
    assert r.verdict is Verdict.MEMORY_LIMIT


@pytest.mark.hostile
def test_output_flood_is_capped_and_killed(runtime, busybox):
    """Gigabytes on both streams: the run dies at the cap, the runner keeps only the cap."""
    script = "head -c 4000000000 /dev/zero >&2 & head -c 4000000000 /dev/zero"
    r = runtime.run(sh(script, limits=Limits(output=1 * MiB, wall_time=20)), busybox)
    assert r.verdict is Verdict.OUTPUT_LIMIT
    assert len(r.stdout) <= 1 * MiB and len(r.stderr) <= 1 * MiB
    assert r.stdout_truncated or r.stderr_truncated
    assert r.wall_time < 10


def test_file_size_limit(runtime, busybox):
    r = runtime.run(sh("head -c 2000000 /dev/zero > /tmp/big",
                       limits=Limits(file_size=1 * MiB)), busybox)
    assert r.verdict is Verdict.FILE_SIZE_LIMIT
    assert r.signal == signal.SIGXFSZ


@pytest.mark.hostile
def test_fork_bomb_is_process_limit_and_dies(runtime, busybox):
    r = runtime.run(sh("f() { f | f & }; f; sleep 5", limits=Limits(pids=32, wall_time=3)),
                    busybox)
    assert r.verdict is Verdict.PROCESS_LIMIT


@pytest.mark.hostile
def test_thread_bomb_is_process_limit(runtime, python):
    code = ("import threading, time\n"
            "while True: threading.Thread(target=time.sleep, args=(60,), daemon=True).start()")
    r = runtime.run(py(code, limits=Limits(pids=32, wall_time=10)), python)
    assert r.verdict is Verdict.PROCESS_LIMIT


def test_strict_profile_kills_blocked_syscall(runtime, python):
    code = "import ctypes; ctypes.CDLL(None).syscall(165, 0, 0, 0, 0, 0)"  # mount(2)
    r = runtime.run(py(code, seccomp="strict"), python)
    assert r.verdict is Verdict.SYSCALL_BLOCKED and r.signal == signal.SIGSYS


def test_setup_error_names_the_stage(runtime, busybox):
    r = runtime.run(RunSpec(cmd=["true"], env=PATH, workdir="/bin/busybox"), busybox)
    assert r.verdict is Verdict.SETUP_ERROR
    assert r.stage == "rootfs" and "not a directory" in r.message


def test_tmp_fill_is_bounded(runtime, busybox):
    r = runtime.run(sh("head -c 100000000 /dev/zero > /tmp/fill; echo $?; wc -c < /tmp/fill",
                       limits=Limits(disk=8 * MiB, file_size=1 << 30)), busybox)
    assert r.verdict is Verdict.OK
    status, size = r.stdout.split()
    assert status == b"1" and int(size) <= 8 * MiB


def test_fd_exhaustion_is_contained(runtime, python):
    code = ("import os\nfds = []\ntry:\n    while True: fds.append(os.open('/dev/null', 0))\n"
            "except OSError as e: print(len(fds), e.errno)")
    r = runtime.run(py(code, limits=Limits(open_files=64)), python)
    assert r.verdict is Verdict.OK
    count, err = r.stdout.split()
    assert int(count) <= 64 and int(err) == 24  # EMFILE


def test_runs_as_non_root_by_default_and_root_on_request(runtime, busybox):
    assert runtime.run(sh("id -u; id -g"), busybox).stdout == b"1000\n1000\n"
    r = runtime.run(sh("id -u", uid=0, gid=0), busybox)
    assert r.stdout == b"0\n"


def test_copy_in_and_copy_out(runtime, busybox):
    from sandbox.spec import FileIn
    spec = sh("cat in/data.txt | tr a-z A-Z > out.txt",
              files=[FileIn("in/data.txt", b"hello")], copy_out=["out.txt", "missing.txt"])
    r = runtime.run(spec, busybox)
    assert r.verdict is Verdict.OK
    assert r.files == {"out.txt": b"HELLO"}
    assert "missing.txt" in r.message
