"""What the api remembers of jobs so that some calls need not ask the runner: only what cannot
change.

- A job's **owner and type** are fixed when it starts, and job ids are never reused while the
  job exists, so they authorize a tail without a runner round trip (StartJob -> tail asks the
  runner once, not twice) for :data:`OWNER_SECONDS` after the api last saw the job.
- Once a job has **ended**, its status is final: GetJobStatus of an ended job is answered from
  here for :data:`FINAL_SECONDS` after the runner last gave it. A running job's status (its
  usage grows) always comes from the runner.

What can still make an entry wrong is the job being removed: a delete through this api forgets
it at once (and a status fetched before the delete is not remembered after it, see
:meth:`JobCache.epoch`); the runner's retention, which removes the oldest jobs beyond its
``max_jobs``, or another client of the runner, is seen within those few seconds. A tail of a
removed job is refused by the runner itself. The cache never decides more than the runner
would: every call is still authenticated and authorized, from the remembered owner.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from shared.model import JobStatus

MAX_JOBS = 4096  # entries kept; the least recently remembered goes first
OWNER_SECONDS = 60.0
FINAL_SECONDS = 1.0


class JobCache:
    def __init__(self, size: int = MAX_JOBS, clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._clock = clock
        self._jobs: OrderedDict[str, tuple[float, JobStatus]] = OrderedDict()
        self._forgets = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def epoch(self) -> int:
        """Take this before asking the runner for a status, give it to :meth:`remember`: a
        job forgotten meanwhile (deleted) is then not remembered from the older answer."""
        return self._forgets

    def remember(self, job: JobStatus, epoch: int | None = None) -> None:
        if epoch is not None and epoch != self._forgets:
            return
        self._jobs[job.id] = (self._clock(), job)
        self._jobs.move_to_end(job.id)
        while len(self._jobs) > self._size:
            self._jobs.popitem(last=False)

    def forget(self, job_id: str) -> None:
        self._forgets += 1
        self._jobs.pop(job_id, None)

    def _fresh(self, job_id: str, seconds: float) -> JobStatus | None:
        entry = self._jobs.get(job_id)
        if entry is None:
            return None
        at, job = entry
        if self._clock() - at > seconds:
            return None
        return job

    def owner(self, job_id: str) -> tuple[str, str] | None:
        """(owner, type) of a job seen within :data:`OWNER_SECONDS`."""
        job = self._fresh(job_id, OWNER_SECONDS)
        return None if job is None else (job.owner, job.type)

    def final(self, job_id: str) -> JobStatus | None:
        """The status of an ended job, as the runner gave it within :data:`FINAL_SECONDS`."""
        job = self._fresh(job_id, FINAL_SECONDS)
        return job if job is not None and job.state.finished else None
