"""What the runner benchmarks share: a runner configuration of their own and its clean-up.

Imported by the scripts beside it (``python bench/NAME.py`` puts this directory on the path).
"""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

from workernator_runner.config import RunnerConfig


def runner_config(state_dir: Path, bridge: str, subnet: ipaddress.IPv4Network) -> RunnerConfig:
    """The defaults, but a state directory, egress bridge and subnet of the bench's own."""
    return RunnerConfig(
        socket=state_dir / "runner.sock",
        socket_group="",
        state_dir=state_dir,
        egress_bridge=bridge,
        egress_subnet=subnet,
    )


def remove_egress_network(bridge: str) -> None:
    """The bridge and nftables table a runner made for a bench (they outlive the runner)."""
    subprocess.run(
        ["nft", "delete", "table", "inet", f"workernator_{bridge}"],
        capture_output=True,
        check=False,
    )
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
