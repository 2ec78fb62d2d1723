"""What the api remembers of jobs so that some calls need not ask the runner: only what cannot
change.

- A job's **owner and type** are fixed when it starts, so they authorize a tail without a
  runner round trip (StartJob -> tail asks the runner once, not twice; 100 tails of one job ask
  it once) for :data:`OWNER_SECONDS` after the api last saw the job.
- Once a job has **ended**, its status is final: GetJobStatus of an ended job is answered from
  here for :data:`FINAL_SECONDS` after the runner last gave it. A running job's status (its
  usage grows) always comes from the runner.

The server uses an entry only to allow a call; anything it would refuse takes the runner's path
(server.py). What can still make an entry wrong is the job's removal: a delete through this api
forgets it at once (and a status fetched before the delete is not remembered after it, see
:meth:`JobCache.epoch`); a removal by the runner's retention, or by another client of the
runner, is seen within :data:`FINAL_SECONDS` for statuses, and a tail of a removed job is
refused by the runner itself. Job ids are drawn at random and only ids in use are avoided, so a
job started beside this api (another client of the runner socket) could draw the id of a job
removed within :data:`OWNER_SECONDS` that the api still remembers: one chance in 36^6 (2.2
billion) per such start. A job started through this api replaces the entry.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from shared.model import JobStatus

MAX_JOBS = 1024  # entries kept; the least recently remembered goes first
OWNER_SECONDS = 60.0
FINAL_SECONDS = 1.0


class _Entry(NamedTuple):
    at: float  # when the runner gave it
    owner: str
    type: str
    final: JobStatus | None  # the status, once the job has ended


class JobCache:
    def __init__(self, size: int = MAX_JOBS, clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._clock = clock
        self._jobs: OrderedDict[str, _Entry] = OrderedDict()
        self._forgets = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def epoch(self) -> int:
        """Take this before asking the runner about a job, give it to :meth:`remember`: a job
        forgotten meanwhile (deleted) is then not remembered from the older answer."""
        return self._forgets

    def remember(self, job: JobStatus, epoch: int) -> None:
        if epoch != self._forgets:
            return
        final = job if job.state.finished else None
        self._jobs[job.id] = _Entry(self._clock(), job.owner, job.type, final)
        self._jobs.move_to_end(job.id)
        while len(self._jobs) > self._size:
            self._jobs.popitem(last=False)

    def forget(self, job_id: str) -> None:
        self._forgets += 1
        self._jobs.pop(job_id, None)

    def _fresh(self, job_id: str, seconds: float) -> _Entry | None:
        entry = self._jobs.get(job_id)
        if entry is None or self._clock() - entry.at > seconds:
            return None
        return entry

    def owner(self, job_id: str) -> tuple[str, str] | None:
        """(owner, type) of a job seen within :data:`OWNER_SECONDS`."""
        entry = self._fresh(job_id, OWNER_SECONDS)
        return None if entry is None else (entry.owner, entry.type)

    def final(self, job_id: str) -> JobStatus | None:
        """The status of an ended job, as the runner gave it within :data:`FINAL_SECONDS`."""
        entry = self._fresh(job_id, FINAL_SECONDS)
        return None if entry is None else entry.final
