"""The system test's fixture: a fresh Debian 12 VM with Workernator installed as an operator
would, following docs/operations.md, and driven from this host through the CLI.

What goes in per run, on a second read-only disk: the wheels (this checkout's and its
dependencies', built on the host: the VM has no outside network), ``deploy/`` and the api's
TLS files. The client side (certificates, the CLI) stays on the host, as on a client machine.
On a failure the report carries the VM's serial console and the units' journal.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, short_tmpdir
from tests.system import image
from tests.system.vm import VM, GuestError, free_port, make_disk

API_PORT = 8443  # the api's port in the VM (deploy/config/api.toml)
USERS = (("alice", "user"), ("admin", "admin"))
# A test host for the wait job inside the VM: a network namespace on the runner's egress
# bridge (deploy/config/runner.toml: wn0, 10.92.0.0/16), serving HTTP on this address.
TEST_HOST = "10.92.255.254"
TEST_HOST_URL = f"http://{TEST_HOST}:8080"
UNITS = "workernator-runner workernator-api"

TIMINGS: dict[str, float] = {}  # step -> seconds, printed at the end of the run
TRANSCRIPT = image.CACHE / "transcript.txt"  # the last run's commands and output


@dataclass
class System:
    """The VM with Workernator running, and the CLI on this host that drives it."""

    vm: VM
    certs: Path
    address: str
    timings: dict[str, float] = field(default_factory=dict)
    transcript: list[str] = field(default_factory=list)  # commands and their output

    def cli(self, *args: str, user: str = "alice", timeout: float = 60) -> str:
        """``workernator ARGS`` as ``user``; its stdout (a failure says what went wrong)."""
        env = dict(
            os.environ,
            WORKERNATOR_HOST=self.address,
            WORKERNATOR_CERT=str(self.certs / f"{user}.pem"),
            WORKERNATOR_KEY=str(self.certs / f"{user}-key.pem"),
            WORKERNATOR_CA=str(self.certs / "server-ca.pem"),
            WORKERNATOR_CONFIG=os.devnull,
        )
        proc = subprocess.run(
            [_cli(), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        command = " ".join(shlex.quote(arg) for arg in args)
        self.transcript.append(f"client$ workernator {command}\n{proc.stdout}{proc.stderr}")
        assert proc.returncode == 0, (
            f"workernator {command} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
        return proc.stdout

    def start(self, *args: str) -> str:
        """Start a job (``jobs start ARGS``); its id."""
        first = self.cli("jobs", "start", *args).splitlines()[0]
        assert first.startswith("Started ") and ", ID: " in first, first
        return first.split(", ID: ")[1].strip()

    def status(self, job_id: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.cli("jobs", "status", job_id, "-o", "json"))
        return data

    def output(self, job_id: str) -> str:
        return self.cli("jobs", "tail", "--no-follow", job_id)

    def wait_ended(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        """The job's status once it is no longer running."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.status(job_id)
            if job["state"] != "JOB_STATE_RUNNING":
                return job
            assert time.monotonic() < deadline, f"job {job_id} still running after {timeout} s"
            time.sleep(0.5)

    def guest(self, command: str, timeout: float = 120) -> str:
        """Run ``command`` as root on the service host (the VM); its output."""
        result = self.vm.run(command, timeout=timeout, check=False)
        self.transcript.append(f"host# {command.strip()}\n{result.out}")
        if result.rc != 0:
            raise GuestError(f"exit status {result.rc} from: {command}\n{result.out}")
        return result.out

    def reboot(self) -> None:
        self.transcript.append("host# systemctl reboot\n")
        self.vm.reboot()
        self.timings["reboot (to the agent)"] = self.vm.timings["reboot"]

    def wait_active(self, timeout: float = 120) -> None:
        """Both units active (after a boot, they may still be starting)."""
        self.guest(
            f"for i in $(seq {int(timeout * 2)}); do "
            # each unit on its own: is-active with several succeeds when any one is active
            f"{' && '.join(f'systemctl is-active --quiet {u}' for u in UNITS.split())} && exit 0; "
            "sleep 0.5; done; "
            f"systemctl status --no-pager {UNITS}; exit 1",
            timeout=timeout + 10,
        )

    def start_test_host(self) -> None:
        """The wait job's HTTP server, on the runner's bridge (once the runner made it)."""
        began = time.monotonic()
        self.guest(
            "for i in $(seq 200); do ip link show wn0 >/dev/null 2>&1 && break; sleep 0.1; done\n"
            "ip netns add wnhost\n"
            "ip -n wnhost link set lo up\n"
            "ip link add wnhost0 type veth peer name eth0 netns wnhost\n"
            "ip link set wnhost0 master wn0 up\n"
            f"ip -n wnhost addr add {TEST_HOST}/16 dev eth0\n"
            "ip -n wnhost link set eth0 up\n"
            "systemd-run --quiet --unit=wn-testhost ip netns exec wnhost python3 -c "
            f"'{_HTTP_SERVER}'\n"
            "for i in $(seq 300); do "
            "ip netns exec wnhost python3 -c 'import socket; socket.create_connection("
            f'("{TEST_HOST}", 8080), 1)\' 2>/dev/null && exit 0; sleep 0.2; done; exit 1'
        )
        self.timings["test host"] = time.monotonic() - began

    def journal(self) -> str:
        try:
            return self.vm.run(
                "journalctl --no-pager -b -o short-monotonic "
                "-u workernator-runner -u workernator-api | tail -n 150",
                timeout=30,
                check=False,
            ).out
        except (GuestError, OSError) as exc:
            return f"(no journal: {exc})"


# Answers every POST with 200 (python3 -c; no single quotes inside).
_HTTP_SERVER = """
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
http.server.HTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def _cli() -> str:
    """The ``workernator`` command of the venv running the tests."""
    return str(Path(sys.executable).parent / "workernator")


def _certificates(pki: Path) -> None:
    """docs/operations.md 1.2 on the administration machine (this host): both CAs, the api's
    pair naming 127.0.0.1 (where this host reaches it, through qemu's port forward), a
    certificate per user."""
    commands = [
        ("ca", "server"),
        ("ca", "client"),
        ("server", "--name", "127.0.0.1"),
        *(("client", user, "--role", role) for user, role in USERS),
    ]
    for command in commands:
        subprocess.run(
            [_cli(), "certs", *command, "--dir", str(pki)], check=True, capture_output=True
        )


def _payload(work: Path, wheels: Path, certs: Path) -> Path:
    """The disk handed to the VM: wheels, deploy/ and the api's TLS files."""
    source = work / "payload"
    shutil.copytree(wheels, source / "wheels")
    shutil.copytree(ROOT / "deploy", source / "deploy")
    (source / "tls").mkdir()
    for name in ("server.pem", "server-key.pem", "client-ca.pem"):
        shutil.copy(certs / name, source / "tls" / name)
    (source / "test").mkdir()
    for name in ("guest_probe.py", "guest_start.py"):
        shutil.copy(Path(__file__).with_name(name), source / "test" / name)
    disk = work / "payload.img"
    make_disk(source, disk)
    shutil.rmtree(source)
    return disk


# docs/operations.md 1.1 ("from wheels") and 1.2, as an operator types them on the service host;
# the payload disk stands in for the files copied over from the build and administration
# machines. Then 1.3 (the configs as installed) and 1.4 (ENABLE).
INSTALL = """
set -e
mkdir -p /mnt/payload && mount -o ro /dev/vdb /mnt/payload
/mnt/payload/deploy/install.sh --wheels /mnt/payload/wheels
cd /mnt/payload/tls
install -d -m 0750 -o root -g workernator-api /etc/workernator/tls
install -m 0644 server.pem client-ca.pem /etc/workernator/tls/
install -m 0600 -o workernator-api -g workernator-api server-key.pem /etc/workernator/tls/
"""
# The one addition to the operator's steps: a job type that allocates, for the memory limit
# (guest_probe.py), loaded by the runner as an extra job module.
TEST_JOB_MODULE = r"""
set -e
site=$(/opt/workernator/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
install -m 0644 /mnt/payload/test/guest_probe.py "$site/wn_vmprobe.py"
sed -i 's/^\[runner\]$/[runner]\njob_modules = ["wn_vmprobe"]/' /etc/workernator/runner.toml
grep -q '^job_modules = \["wn_vmprobe"\]$' /etc/workernator/runner.toml
"""
ENABLE = f"systemctl enable --now {UNITS}"


@pytest.fixture(scope="module")
def system(request: pytest.FixtureRequest) -> Iterator[System]:
    if os.geteuid() != 0:
        pytest.skip("needs root (mmdebstrap, qemu's disks)")
    missing = image.missing_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (make system-deps installs them)")
    wheelhouse: Path = request.getfixturevalue("wheelhouse")  # only once the VM can run
    began = time.monotonic()
    base = image.base_image()
    TIMINGS["image (cached)" if not base.build_seconds else "image build"] = (
        base.build_seconds or time.monotonic() - began
    )
    work = short_tmpdir("wn-sys-")
    step = time.monotonic()
    _certificates(work / "certs")
    payload = _payload(work, wheelhouse, work / "certs")
    TIMINGS["certs + payload disk"] = time.monotonic() - step
    port = free_port()
    vm = VM(base, payload=payload, forwards={port: API_PORT})
    system = System(vm, work / "certs", f"127.0.0.1:{port}", TIMINGS)
    try:
        vm.start()
        TIMINGS["boot"] = vm.timings["boot"]
        try:
            step = time.monotonic()
            system.guest(INSTALL, timeout=600)
            system.guest(TEST_JOB_MODULE)
            TIMINGS["install.sh + TLS files"] = time.monotonic() - step
            step = time.monotonic()
            system.guest(ENABLE, timeout=300)
            TIMINGS["systemctl enable --now"] = time.monotonic() - step
            system.start_test_host()
        except GuestError as exc:
            raise GuestError(f"{exc}\n--- journal ---\n{system.journal()}") from None
        yield system
        step = time.monotonic()
        vm.poweroff()
        TIMINGS["power-off"] = time.monotonic() - step
    finally:
        vm.close()
        shutil.rmtree(work, ignore_errors=True)
        TIMINGS["total"] = time.monotonic() - began
        TRANSCRIPT.write_text("\n".join(system.transcript))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed VM test's report ends with the console's last lines and the units' journal."""
    outcome: Any = yield
    report: pytest.TestReport = outcome.get_result()
    funcargs = getattr(item, "funcargs", {})
    system = funcargs.get("system")
    if report.failed and isinstance(system, System):
        report.sections.append(
            ("VM: journalctl -u workernator-runner -u workernator-api", system.journal())
        )
        report.sections.append(("VM: serial console", system.vm.console_tail(80)))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.write_sep("-", "VM system test timings")
        for name, seconds in TIMINGS.items():
            unit = "" if "ratio" in name else " s"
            terminalreporter.write_line(f"{name:>36}: {seconds:7.2f}{unit}")
