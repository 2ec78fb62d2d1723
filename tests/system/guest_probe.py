"""A job type for the system test's memory limit, installed into the VM's runner only.

The built-in jobs never hold more than a few MiB (fib 1000000 peaks at about 5 MiB, under the
32 MiB minimum limit), so none of them can show the memory limit at work. The test adds this
module to the runner's ``job_modules`` and starts ``hog`` at the runner's socket as root (the
api offers only the built-in types).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.catalog import ArgKind, ArgSpec, JobSpec
from workernator_runner.jobs import Job


def _hog(args: Mapping[str, Any]) -> None:
    held = [bytearray(1 << 20) for _ in range(args["megabytes"])]  # zeroed: every page touched
    print(f"allocated {len(held)} MiB", flush=True)


JOBS = (
    Job(
        JobSpec(
            "hog",
            "Hog",
            "allocates and touches memory",
            (ArgSpec("megabytes", ArgKind.INT, "MiB to allocate", minimum=1, maximum=4096),),
        ),
        _hog,
    ),
)
