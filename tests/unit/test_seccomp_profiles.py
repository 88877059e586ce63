"""Seccomp profiles are data; compiling them is checked without loading anything."""

from __future__ import annotations

import tempfile

import pytest

from sandbox import seccomp


def pfc(profile: seccomp.Profile) -> str:
    flt = seccomp.build_filter(profile)
    with tempfile.TemporaryFile() as f:
        flt.export_pfc(f)
        f.seek(0)
        return f.read().decode()


def test_required_denials_are_not_allowed():
    must_block = {"mount", "umount2", "fsopen", "fsconfig", "fsmount", "move_mount", "open_tree",
                  "pivot_root", "unshare", "setns", "ptrace", "process_vm_readv",
                  "process_vm_writev", "bpf", "perf_event_open", "userfaultfd", "keyctl",
                  "add_key", "request_key", "io_uring_setup", "io_uring_enter",
                  "io_uring_register", "kexec_load", "kexec_file_load", "init_module",
                  "finit_module", "delete_module", "open_by_handle_at", "settimeofday",
                  "clock_settime", "adjtimex"}
    for profile in seccomp.PROFILES.values():
        assert must_block <= set(profile.denied)
        assert not must_block & set(profile.allowed)


def test_overlap_is_rejected():
    bad = seccomp.Profile("bad", ("read", "mount"), ("mount",), "errno")
    with pytest.raises(ValueError, match="mount"):
        seccomp.build_filter(bad)


def test_compiled_programs_are_bpf():
    programs = seccomp.compile_all()
    assert set(programs) == {"default", "strict"}
    for program in programs.values():
        assert program.size % 8 == 0 and program.size > 8 * 100


def test_default_denies_with_eperm_strict_kills_other_abis_killed():
    default, strict = pfc(seccomp.PROFILES["default"]), pfc(seccomp.PROFILES["strict"])
    for text in (default, strict):
        # unknown syscalls: EPERM; any other architecture (int 0x80, x32): the process dies
        assert text.rstrip().split("# default action")[1].split("\n")[1].strip() \
            == "action ERRNO(1);"
        assert "# invalid architecture action\naction KILL_PROCESS;" in text
        # clone3 and syscalls newer than the profile: ENOSYS, so libc falls back
        assert 'syscall "clone3" (435)' in text and "ERRNO(38)" in text
    # the deny list is EPERM in default, a kill in strict
    assert default.count("action KILL_PROCESS;") == 1
    assert strict.count("action KILL_PROCESS;") > 40
