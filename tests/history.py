"""A long history of finished jobs, made fast: copies of real jobs' directories.

Ten thousand real sandboxed jobs take ten minutes or more on a small shared host. What a
runner reads of a finished job is its directory, so a history is made of a few jobs that
really ran, copied under new ids and older times: the same files, byte for byte but the id
and the times, as the runner and the monitors wrote them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from shared import ids
from workernator_runner import store


def clone_history(jobs_dir: Path, models: list[str], count: int, *, oldest_ns: int) -> list[str]:
    """``count`` copies of the finished jobs ``models`` (ids in ``jobs_dir``), created one
    millisecond apart from ``oldest_ns`` on, each ending a millisecond after it was created.
    Returns their ids, oldest first."""
    made: list[str] = []
    taken = {p.name for p in jobs_dir.iterdir()}
    sources = [
        (
            json.loads((jobs_dir / m / store.JOB_FILE).read_bytes()),
            json.loads((jobs_dir / m / store.STATE_FILE).read_bytes()),
            jobs_dir / m / store.OUTPUT_FILE,
        )
        for m in models
    ]
    for n in range(count):
        job_id = ids.new_job_id()
        while job_id in taken:
            job_id = ids.new_job_id()
        taken.add(job_id)
        request, state, output = sources[n % len(sources)]
        created = oldest_ns + n * 1_000_000
        state = dict(state, started_ns=created, ended_ns=created + 1_000_000)
        target = jobs_dir / job_id
        target.mkdir(mode=0o700)
        request = dict(request, id=job_id, created_ns=created)
        (target / store.JOB_FILE).write_text(json.dumps(request))
        (target / store.STATE_FILE).write_text(json.dumps(state))
        if output.exists():
            shutil.copyfile(output, target / store.OUTPUT_FILE)
        for name in os.listdir(target):
            os.chmod(target / name, 0o600)
        made.append(job_id)
    return made
