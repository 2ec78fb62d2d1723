"""Job implementations and the registry the runner starts them from.

A job is a :class:`~shared.catalog.JobSpec` (name, title, typed arguments) plus a ``run``
function. ``run`` is called in the job process with arguments already validated; it writes its
output to stdout/stderr and returns normally on success. Raising :class:`JobFailed` (or any
exception) ends the job FAILED with a clear error line.

Extra job types come from modules named in the runner config (``job_modules``); each such
module has a ``JOBS`` sequence of :class:`Job`. The tests use this for probe jobs.
"""

from __future__ import annotations

import enum
import importlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from shared.catalog import JobSpec
from shared.errors import InvalidArgument
from workernator_runner.config import ConfigError


class JobFailed(Exception):
    """The job could not do its work; the message is printed as its error line."""


class Network(enum.StrEnum):
    """What a job type may reach (design section 7)."""

    NONE = "none"  # its own network namespace with only loopback
    EGRESS = "egress"  # plus outbound connections through the runner's bridge and NAT


@dataclass(frozen=True)
class Job:
    spec: JobSpec
    run: Callable[[Mapping[str, Any]], None]
    # Print the "[JOB] Starting job ..." and "[JOB] Complete" lines around the job's output.
    framed: bool = True
    network: Network = Network.NONE


class Registry(Mapping[str, Job]):
    def __init__(self, jobs: Iterable[Job]) -> None:
        self._jobs: dict[str, Job] = {}
        for job in jobs:
            if job.spec.name in self._jobs:
                raise ValueError(f"job type {job.spec.name!r} is defined twice")
            self._jobs[job.spec.name] = job

    def __getitem__(self, name: str) -> Job:
        return self._jobs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)

    def lookup(self, name: str) -> Job:
        try:
            return self._jobs[name]
        except KeyError:
            known = ", ".join(sorted(self._jobs))
            raise InvalidArgument(f"unknown job type {name!r} (known: {known})") from None

    def validate(self, name: str, args: Mapping[str, object]) -> dict[str, Any]:
        return self.lookup(name).spec.validate(args)


def load_registry(modules: Iterable[str] = ()) -> Registry:
    """The built-in jobs plus the ``JOBS`` of each named module."""
    from workernator_runner.jobs import builtin  # noqa: PLC0415 - builtin imports this module

    jobs: list[Job] = list(builtin.JOBS)
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # any failure while importing is a configuration problem
            raise ConfigError(f"job module {name!r} cannot be imported: {exc!r}") from None
        extra = getattr(module, "JOBS", None)
        if extra is None or not all(isinstance(job, Job) for job in extra):
            raise ConfigError(f"job module {name!r} has no JOBS sequence of Job")
        jobs.extend(extra)
    try:
        return Registry(jobs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run_job(job: Job, args: Mapping[str, Any]) -> int:
    """Run ``job`` with its framing lines, in the job process; returns the exit status."""
    if job.framed:
        print(f"[JOB] Starting job '{job.spec.title}'", flush=True)
    try:
        job.run(args)
    except JobFailed as exc:
        print(f"[ERROR] {exc}", file=sys.stderr, flush=True)
        if job.framed:
            print("[JOB] Failed", flush=True)
        return 1
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        print(f"[ERROR] The job crashed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if job.framed:
            print("[JOB] Failed", flush=True)
        return 1
    if job.framed:
        print("[JOB] Complete", flush=True)
    sys.stdout.flush()
    return 0
