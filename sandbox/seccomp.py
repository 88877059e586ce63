"""Seccomp profiles as data, compiled once to classic BPF with pyseccomp (libseccomp).

The default profile follows Docker's: an allowlist of syscalls ordinary programs use, with
argument checks where a syscall is safe only for some arguments (clone without namespace
flags, socket without AF_ALG/AF_VSOCK, harmless personality values). Anything else fails:
EPERM for syscalls the profile knows, ENOSYS for syscalls newer than the profile (and clone3,
whose flags sit in memory a filter cannot read) so libc falls back to an older call. Other
ABIs (32-bit int 0x80, x32) kill the process. The "strict" profile kills on the explicit
deny list instead of returning EPERM, which gives the SYSCALL_BLOCKED verdict.

Compiling takes milliseconds, so the helper compiles each profile once at start and every run
loads the same bytes (sandbox.syscalls.SeccompProgram) as the very last step before execve.
"""

from __future__ import annotations

import errno
import tempfile

import msgspec
import pyseccomp

from sandbox import syscalls

NAMESPACE_FLAGS = (syscalls.CLONE_NEWNS | syscalls.CLONE_NEWCGROUP | syscalls.CLONE_NEWUTS
                   | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWPID
                   | syscalls.CLONE_NEWNET | 0x80)  # 0x80: CLONE_NEWTIME
AF_ALG = 38
AF_VSOCK = 40
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
HIGHEST_KNOWN_SYSCALL = 456
"""x86_64 syscalls above this number are newer than the profile: they get ENOSYS."""
SYSCALL_NUMBER_CEILING = 512

ALLOWED = """
accept accept4 access alarm arch_prctl bind brk capget capset chdir chmod chown clock_getres
clock_gettime clock_nanosleep close close_range connect copy_file_range creat dup dup2 dup3
epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd eventfd2
execve execveat exit exit_group faccessat faccessat2 fadvise64 fallocate fchdir fchmod fchmodat
fchmodat2 fchown fchownat fcntl fdatasync fgetxattr flistxattr flock fork fremovexattr
fsetxattr fstat fstatfs fsync ftruncate futex futex_requeue futex_wait futex_waitv futex_wake
futimesat getcpu getcwd getdents getdents64 getegid geteuid getgid getgroups getitimer
getpeername getpgid getpgrp getpid getppid getpriority getrandom getresgid getresuid getrlimit
get_robust_list getrusage getsid getsockname getsockopt get_thread_area gettid gettimeofday
getuid getxattr inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl
io_destroy io_getevents io_pgetevents ioprio_get ioprio_set io_setup io_submit kill
landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lgetxattr link linkat
listen listxattr llistxattr lremovexattr lseek lsetxattr lstat madvise membarrier memfd_create
mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mprotect mq_getsetattr
mq_notify mq_open mq_timedreceive mq_timedsend mq_unlink mremap msgctl msgget msgrcv msgsnd
msync munlock munlockall munmap nanosleep newfstatat open openat openat2 pause pidfd_open
pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll prctl pread64
preadv preadv2 prlimit64 process_mrelease pselect6 pwrite64 pwritev pwritev2 read readahead
readlink readlinkat readv recvfrom recvmmsg recvmsg remap_file_pages removexattr rename
renameat renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask
rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo
sched_getaffinity sched_getattr sched_getparam sched_get_priority_max sched_get_priority_min
sched_getscheduler sched_rr_get_interval sched_setaffinity sched_setattr sched_setparam
sched_setscheduler sched_yield seccomp select semctl semget semop semtimedop sendfile
sendmmsg sendmsg sendto setfsgid setfsuid setgid setgroups setitimer setpgid setpriority
setregid setresgid setresuid setreuid setrlimit set_robust_list setsid setsockopt
set_thread_area set_tid_address setuid setxattr shmat shmctl shmdt shmget shutdown
sigaltstack signalfd signalfd4 socketpair splice stat statfs statx symlink symlinkat sync
sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete timer_getoverrun
timer_gettime timer_settime timerfd_create timerfd_gettime timerfd_settime times tkill
truncate umask uname unlink unlinkat utime utimensat utimes vfork vmsplice wait4 waitid write
writev
""".split()

DENIED = """
mount umount2 fsopen fsconfig fsmount fspick move_mount open_tree mount_setattr pivot_root
chroot unshare setns ptrace process_vm_readv process_vm_writev bpf perf_event_open
userfaultfd keyctl add_key request_key io_uring_setup io_uring_enter io_uring_register
kexec_load kexec_file_load init_module finit_module delete_module open_by_handle_at
name_to_handle_at settimeofday clock_settime clock_adjtime adjtimex reboot swapon swapoff
acct quotactl quotactl_fd lookup_dcookie syslog vhangup iopl ioperm modify_ldt uselib
pidfd_getfd process_madvise memfd_secret fanotify_init fanotify_mark kcmp
""".split()
"""Blocked on purpose: EPERM in the default profile, SIGSYS in the strict one."""


class Profile(msgspec.Struct, frozen=True):
    name: str
    allowed: tuple[str, ...]
    denied: tuple[str, ...]
    deny_action: str  # "errno" or "kill"


PROFILES = {
    "default": Profile("default", tuple(ALLOWED), tuple(DENIED), "errno"),
    "strict": Profile("strict", tuple(ALLOWED), tuple(DENIED), "kill"),
}


def build_filter(profile: Profile) -> pyseccomp.SyscallFilter:
    overlap = set(profile.allowed) & set(profile.denied)
    if overlap:
        raise ValueError(f"syscalls both allowed and denied: {sorted(overlap)}")
    flt = pyseccomp.SyscallFilter(pyseccomp.ERRNO(errno.EPERM))
    flt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    # A binary tree of syscall numbers: the kernel emulates the filter for every syscall
    # number when it is attached (its action cache), so a shallow tree loads faster, every run.
    flt.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
    for name in profile.allowed:
        flt.add_rule(pyseccomp.ALLOW, name)
    deny = pyseccomp.KILL_PROCESS if profile.deny_action == "kill" else pyseccomp.ERRNO(errno.EPERM)
    for name in profile.denied:
        try:
            flt.add_rule(deny, name)
        except OSError:
            continue  # unknown to this libseccomp: the default action covers it
    flt.add_rule(pyseccomp.ALLOW, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, NAMESPACE_FLAGS, 0))
    flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    flt.add_rule(pyseccomp.ALLOW, "socket", pyseccomp.Arg(0, pyseccomp.LT, AF_ALG))
    flt.add_rule(pyseccomp.ALLOW, "socket", pyseccomp.Arg(0, pyseccomp.EQ, AF_ALG + 1))
    flt.add_rule(pyseccomp.ALLOW, "socket", pyseccomp.Arg(0, pyseccomp.GT, AF_VSOCK))
    for value in PERSONALITY_ALLOWED:
        flt.add_rule(pyseccomp.ALLOW, "personality", pyseccomp.Arg(0, pyseccomp.EQ, value))
    for number in range(HIGHEST_KNOWN_SYSCALL + 1, SYSCALL_NUMBER_CEILING):
        flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), number)
    return flt


def compile_profile(profile: Profile) -> bytes:
    """The profile as raw BPF bytes (struct sock_filter array)."""
    flt = build_filter(profile)
    with tempfile.TemporaryFile() as f:
        flt.export_bpf(f)
        f.seek(0)
        return f.read()


def compile_all() -> dict[str, syscalls.SeccompProgram]:
    """Every profile compiled, keyed by name; done once per helper process."""
    return {name: syscalls.SeccompProgram(compile_profile(p)) for name, p in PROFILES.items()}

