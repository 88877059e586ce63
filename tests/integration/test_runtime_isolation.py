"""What untrusted code cannot do: syscalls, network, host files, privilege, copy-out tricks."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import threading
import time

import pytest

from sandbox.spec import Limits, Rootfs, RunSpec, Verdict

pytestmark = pytest.mark.rootless

PATH = {"PATH": "/usr/local/bin:/usr/bin:/bin"}


def sh(script: str, **kw) -> RunSpec:
    return RunSpec(cmd=["/bin/sh", "-c", script], **{"env": PATH, **kw})


def py(code: str, **kw) -> RunSpec:
    return RunSpec(cmd=["python3", "-c", code], **{"env": PATH, **kw})


SYSCALL_PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
calls = {"mount": (165, b"none", b"/tmp", b"tmpfs", 0, 0), "umount2": (166, b"/proc", 2),
         "unshare": (272, 0x10000000), "setns": (308, 0, 0), "ptrace": (101, 16, 1, 0, 0),
         "keyctl": (250, 0, 0, 0, 0), "add_key": (248, b"user", b"k", b"v", 1, 0xfffffffd),
         "bpf": (321, 0, 0, 0), "io_uring_setup": (425, 8, 0), "perf_event_open": (298, 0, 0, -1, -1, 0),
         "userfaultfd": (323, 0), "pivot_root": (155, b"/", b"/"), "kexec_load": (246, 0, 0, 0, 0),
         "init_module": (175, 0, 0, b""), "open_by_handle_at": (304, 0, 0, 0),
         "settimeofday": (164, 0, 0), "clone_newns": (56, 0x20000 | 17, 0, 0, 0, 0),
         "clone3": (435, 0, 0), "future": (500,), "af_alg": (41, 38, 5, 0),
         "af_vsock": (41, 40, 1, 0), "personality_bad": (135, 0x0400000)}
for name, args in calls.items():
    r = libc.syscall(*args)
    print(name, r, ctypes.get_errno())
"""


def test_dangerous_syscalls_are_refused(runtime, python):
    r = runtime.run(py(SYSCALL_PROBE, uid=0, gid=0), python)  # even as in-container root
    assert r.verdict is Verdict.OK, r.stderr
    seen = {}
    for line in r.stdout.decode().splitlines():
        name, ret, err = line.split()
        seen[name] = (int(ret), int(err))
    for name, (ret, err) in seen.items():
        assert ret == -1, f"{name} succeeded"
        expected = errno.ENOSYS if name in ("clone3", "future") else errno.EPERM
        assert err == expected, f"{name}: errno {err}, expected {expected}"
    assert len(seen) == 22


def test_only_loopback_network(runtime, python):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    code = f"""
import socket
print(sorted(n for _, n in socket.if_nameindex()))
for addr in [("127.0.0.1", {port}), ("10.0.0.1", 80)]:
    s = socket.socket(); s.settimeout(2)
    print(addr[0], s.connect_ex(addr))
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
c = socket.create_connection(srv.getsockname()); print("self", srv.accept()[0].fileno() > 0)
"""
    try:
        r = runtime.run(py(code), python)
    finally:
        listener.close()
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "['lo']"
    assert lines[1] == f"127.0.0.1 {errno.ECONNREFUSED}"  # its own loopback, not the host's
    assert lines[2] == f"10.0.0.1 {errno.ENETUNREACH}"
    assert lines[3] == "self True"
    assert accepted == []


def test_environment_and_host_files_do_not_leak(runtime, python):
    os.environ["SBX_TEST_SECRET"] = "hunter2"
    code = """
import os
print(sorted(os.environ))
print(sorted(p for p in os.listdir('/proc') if p.isdigit()))
for path in ['/etc/shadow', '/proc/1/environ', '/proc/keys', '/sys/kernel']:
    try:
        data = open(path, 'rb').read(); print(path, 'read', len(data))
    except OSError as e:
        print(path, 'error', e.errno)
"""
    try:
        r = runtime.run(py(code, env={"PATH": "/usr/bin:/bin", "ONLY": "1"}), python)
    finally:
        del os.environ["SBX_TEST_SECRET"]
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "['ONLY', 'PATH']"
    assert lines[1] == "['1', '2']"  # init and ourselves: no host processes
    assert b"hunter2" not in r.stdout
    results = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert results["/etc/shadow"][0] == "error"  # not in the image: the host's is not there
    assert results["/proc/1/environ"] == ["error", str(errno.EACCES)]  # init is not dumpable
    assert results["/proc/keys"] == ["read", "0"]  # masked
    assert results["/sys/kernel"][0] == "error"  # no /sys


def test_runs_do_not_see_each_other(runtime, busybox):
    first = runtime.run(sh("echo secret > /tmp/a; echo secret > /work/b; echo x > /etc/c; "
                           "ls /tmp /work", uid=0, gid=0), busybox)
    assert first.verdict is Verdict.OK and b"a" in first.stdout
    second = runtime.run(sh("cat /tmp/a /work/b /etc/c 2>&1; ls -A /tmp /work"), busybox)
    assert b"secret" not in second.stdout and b"No such file" in second.stdout


def test_concurrent_runs_are_isolated(runtime, busybox):
    results = {}

    def go(name):
        results[name] = runtime.run(
            sh(f"echo {name} > /work/me; sleep 0.3; cat /work/me; ls /work"), busybox)

    threads = [threading.Thread(target=go, args=(f"run{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, r in results.items():
        assert r.stdout == f"{name}\nme\n".encode()


def test_setuid_binary_gives_no_privilege(runtime, busybox, busybox_rootfs, tmp_path):
    layer = tmp_path / "suid-layer"
    (layer / "opt").mkdir(parents=True)
    shutil.copy2(busybox_rootfs / "bin/busybox", layer / "opt/busybox")
    os.chmod(layer / "opt/busybox", 0o4755)  # owned by us = root inside the container
    assert os.stat(layer / "opt/busybox").st_mode & stat.S_ISUID
    rootfs = Rootfs(layers=(str(busybox_rootfs), str(layer)))
    r = runtime.run(RunSpec(cmd=["/opt/busybox", "id", "-u"], env=PATH), rootfs)
    assert r.verdict is Verdict.OK and r.stdout == b"1000\n"
    r = runtime.run(sh("grep -E '^(Cap(Eff|Prm|Bnd)|NoNewPrivs|Seccomp):' /proc/self/status",
                       uid=0, gid=0), busybox)
    status = dict(line.split(":\t") for line in r.stdout.decode().splitlines())
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"


@pytest.mark.parametrize("plant", [
    "ln -s /etc/passwd out",                  # symlink to a file of the image / host
    "ln -s /proc/self/environ out",           # magic link
    "mkfifo out",                             # would hang a naive reader
    "mkdir d; ln -s / d/up; echo x > real; ln -s d/up/etc/passwd out",
])
def test_copy_out_refuses_planted_links_and_fifos(runtime, busybox, plant):
    start = time.monotonic()
    r = runtime.run(sh(plant, copy_out=["out"]), busybox)
    assert time.monotonic() - start < 5
    assert r.verdict is Verdict.OK
    assert r.files == {} and "out: refused" in r.message


def test_copy_out_through_symlinked_directory_is_refused(runtime, busybox):
    r = runtime.run(sh("ln -s /etc dir", copy_out=["dir/passwd"]), busybox)
    assert r.files == {} and "refused" in r.message


def test_copy_out_size_cap(runtime, busybox):
    r = runtime.run(sh("head -c 5000 /dev/zero > big", copy_out=["big"],
                       limits=Limits(output=4096)), busybox)
    assert r.files == {} and "cap" in r.message


def test_read_only_root(runtime, busybox):
    r = runtime.run(sh("touch /etc/x 2>&1; touch /tmp/ok && echo tmp-ok", read_only_root=True,
                       uid=0, gid=0), busybox)
    assert b"Read-only file system" in r.stdout and b"tmp-ok" in r.stdout


def test_dev_is_minimal_and_read_only_shm_is_tmp(runtime, busybox):
    r = runtime.run(sh("ls /dev; touch /dev/x 2>&1; echo shm > /dev/shm/f; cat /tmp/f; "
                       "echo data > /dev/null && echo null-ok", uid=0, gid=0), busybox)
    listing, rest = r.stdout.split(b"touch", 1)
    assert set(listing.split()) == {b"fd", b"full", b"null", b"ptmx", b"pts", b"random",
                                    b"shm", b"stderr", b"stdin", b"stdout", b"tty", b"urandom",
                                    b"zero"}
    assert b"Read-only file system" in rest
    assert b"shm\n" in rest and b"null-ok" in rest


INT80_PROBE = """
import ctypes, mmap
# mov eax, 20 (getpid in the 32-bit table); int 0x80; ret
code = bytes([0xb8, 0x14, 0, 0, 0, 0xcd, 0x80, 0xc3])
buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(code)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
print("calling", flush=True)
ctypes.CFUNCTYPE(ctypes.c_int)(addr)()
print("survived")
"""


@pytest.mark.parametrize("probe", [
    INT80_PROBE,
    "import ctypes; print('calling', flush=True); "
    "ctypes.CDLL(None).syscall(0x40000000 | 39); print('survived')",  # x32 getpid
], ids=["int80", "x32"])
def test_other_syscall_abis_are_killed(runtime, python, probe):
    r = runtime.run(py(probe), python)
    assert r.stdout == b"calling\n"
    assert r.verdict is Verdict.SYSCALL_BLOCKED and r.signal == 31  # SIGSYS


def test_layer_diff_refuses_a_sparse_file_bigger_than_the_disk(runtime, busybox, tmp_path):
    out = tmp_path / "layer.tar"
    spec = sh("echo kept > /etc/new; truncate -s 1G /etc/huge", uid=0, gid=0,
              limits=Limits(disk=8 << 20, file_size=2 << 30))  # RLIMIT_FSIZE would stop it
    r = runtime.run(spec, busybox, diff_tar=str(out))
    assert r.verdict is Verdict.INTERNAL_ERROR and "sparse" in r.message
    assert not out.exists()
    ok = runtime.run(sh("echo kept > /etc/new", uid=0, gid=0), busybox, diff_tar=str(out))
    assert ok.verdict is Verdict.OK
    import tarfile
    with tarfile.open(out) as tar:
        assert tar.extractfile("etc/new").read() == b"kept\n"
