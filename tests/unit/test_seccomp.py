"""The seccomp filter as data: the compiled program and the deny list (nothing is loaded here)."""

from __future__ import annotations

import os
import platform
import struct
import subprocess
import sys

import pyseccomp
import pytest

from workernator_runner import seccomp

# struct sock_filter, and the few BPF opcodes the checks below read.
INSN = struct.Struct("<HBBI")
BPF_LD_W_ABS = 0x20  # A = seccomp_data[k]
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_RET_K = 0x06
SECCOMP_DATA_ARCH = 4  # offsetof(struct seccomp_data, arch)
SECCOMP_RET_KILL_PROCESS = 0x80000000

# Names newer than the libseccomp this project runs on (2.5.4 in Debian 12): kept in DENIED so
# that a newer libseccomp refuses them too. Linux version that added each.
NEWER_THAN_LIBSECCOMP = {"open_tree_attr": "6.15"}

# Architectures a name may belong to (vm86 is i386-only, umount is absent from x86_64, ...).
ARCHES = [
    pyseccomp.Arch.X86_64,
    pyseccomp.Arch.X86,
    pyseccomp.Arch.AARCH64,
    pyseccomp.Arch.ARM,
    pyseccomp.Arch.S390X,
    pyseccomp.Arch.PPC64LE,
    pyseccomp.Arch.MIPS,
]

# What the design asks for at the least.
REQUIRED = """
    unshare setns mount umount2 umount pivot_root chroot fsopen fsconfig fsmount fspick
    move_mount open_tree mount_setattr clone clone3 ptrace process_vm_readv process_vm_writev
    kcmp bpf perf_event_open keyctl add_key request_key init_module finit_module delete_module
    kexec_load kexec_file_load reboot swapon swapoff acct quotactl syslog settimeofday
    clock_settime clock_adjtime adjtimex sethostname setdomainname iopl ioperm uselib
    userfaultfd open_by_handle_at name_to_handle_at lookup_dcookie io_uring_setup
    io_uring_enter io_uring_register personality vhangup nfsservctl get_kernel_syms
    query_module create_module _sysctl vm86 vm86old sysfs ustat fanotify_init mbind
    set_mempolicy migrate_pages move_pages
"""


def instructions(program: bytes) -> list[tuple[int, int, int, int]]:
    return [INSN.unpack_from(program, i) for i in range(0, len(program), INSN.size)]


def test_the_program_is_whole_sock_filter_instructions_within_the_kernel_limit() -> None:
    program = seccomp.build_filter()
    assert len(program) % 8 == 0
    assert 0 < len(program) // 8 <= seccomp.BPF_MAXINSNS


def test_build_filter_is_deterministic_even_across_processes() -> None:
    program = seccomp.build_filter()
    assert seccomp.build_filter() == program
    # Another interpreter, with another string-hash seed, compiles the same bytes.
    code = (
        "import sys; from workernator_runner import seccomp; "
        "sys.stdout.buffer.write(seccomp.build_filter())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True)
    assert other.stdout == program


def test_the_program_first_checks_the_architecture_and_kills_on_any_other() -> None:
    insns = instructions(seccomp.build_filter())
    assert insns[0] == (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH)
    code, jt, jf, k = insns[1]
    assert (code, k) == (BPF_JEQ_K, pyseccomp.system_arch())
    assert jt == 0
    assert insns[2 + jf] == (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x32 exists on x86_64 only")
def test_on_x86_64_the_program_also_catches_x32_call_numbers() -> None:
    # x32 calls carry the x86_64 arch value; only bit 30 of the call number tells them apart.
    insns = instructions(seccomp.build_filter())
    assert any(code == BPF_JGE_K and k == 0x40000000 for code, _, _, k in insns[:6])


def test_every_denied_name_is_a_real_system_call_with_a_reason() -> None:
    unknown = [
        name
        for name in seccomp.DENIED
        if all(pyseccomp.resolve_syscall(arch, name) < 0 for arch in ARCHES)
    ]
    assert unknown == [n for n in NEWER_THAN_LIBSECCOMP if n in seccomp.DENIED]
    for name, reason in seccomp.DENIED.items():
        assert reason.strip(), name


def test_the_deny_list_covers_what_the_design_requires() -> None:
    missing = [name for name in REQUIRED.split() if name not in seccomp.DENIED]
    assert missing == []


def test_system_calls_a_job_needs_are_not_denied() -> None:
    needed = "read write openat close mmap futex execve wait4 fork vfork socket connect sendto"
    # clone and socket are listed, but refused only with namespace flags / AF_VSOCK.
    assert [n for n in needed.split() if n in seccomp.DENIED] == ["socket"]
    assert seccomp.DENIED["socket"].startswith("only AF_VSOCK")
    assert seccomp.DENIED["clone"].startswith("only with a CLONE_NEW* flag")


@pytest.mark.parametrize("program", [b"", b"\0" * 7, b"\0" * 8 * (seccomp.BPF_MAXINSNS + 1)])
def test_load_refuses_what_is_not_a_program_before_touching_the_process(program: bytes) -> None:
    with pytest.raises(ValueError, match="not a seccomp BPF program"):
        seccomp.load(program)
