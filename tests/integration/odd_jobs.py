"""A job module whose one job type is described beyond what the protocol carries (a title of
65 characters): a runner misconfiguration the api's connection to the runner must survive."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.catalog import JobSpec
from workernator_runner.jobs import Job


def _nothing(args: Mapping[str, Any]) -> None:
    pass


JOBS = (Job(JobSpec("odd", "T" * 65, "a title longer than the protocol carries"), _nothing),)
