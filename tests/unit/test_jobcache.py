"""The api's memory of jobs: only what cannot change, for a few seconds, never after a delete."""

from __future__ import annotations

from dataclasses import replace

from shared.model import JobState, JobStatus
from workernator_api.jobcache import FINAL_SECONDS, OWNER_SECONDS, JobCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _job(job_id: str = "ABC123", state: JobState = JobState.COMPLETED) -> JobStatus:
    return JobStatus(id=job_id, type="noop", args={}, owner="alice", state=state, created_ns=1)


def test_an_ended_status_is_kept_for_final_seconds_and_an_owner_longer() -> None:
    clock = Clock()
    cache = JobCache(clock=clock)
    job = _job()
    cache.remember(job, cache.epoch())
    assert cache.final(job.id) is job and cache.owner(job.id) == ("alice", "noop")
    clock.now += FINAL_SECONDS + 0.01
    assert cache.final(job.id) is None
    assert cache.owner(job.id) == ("alice", "noop")
    clock.now += OWNER_SECONDS
    assert cache.owner(job.id) is None
    assert cache.final("ZZZ999") is None and cache.owner("ZZZ999") is None


def test_a_running_status_is_never_final_but_names_its_owner() -> None:
    cache = JobCache(clock=Clock())
    running = _job(state=JobState.RUNNING)
    cache.remember(running, cache.epoch())
    assert cache.final(running.id) is None
    assert cache.owner(running.id) == ("alice", "noop")
    ended = replace(running, state=JobState.STOPPED)
    cache.remember(ended, cache.epoch())
    assert cache.final(running.id) is ended


def test_a_forgotten_job_is_not_remembered_from_an_answer_older_than_the_forget() -> None:
    cache = JobCache(clock=Clock())
    job = _job()
    cache.remember(job, cache.epoch())
    epoch = cache.epoch()  # a status request goes out...
    cache.forget(job.id)  # ...the job is deleted meanwhile...
    cache.remember(job, epoch)  # ...and the old answer comes back
    assert cache.final(job.id) is None and cache.owner(job.id) is None
    cache.remember(job, cache.epoch())
    assert cache.final(job.id) is job


def test_the_cache_is_bounded_and_drops_the_least_recently_remembered() -> None:
    cache = JobCache(size=3, clock=Clock())
    for n in range(5):
        cache.remember(_job(f"JOB00{n}"), cache.epoch())
    cache.remember(_job("JOB002"), cache.epoch())  # remembered again: now the newest
    cache.remember(_job("JOB005"), cache.epoch())
    assert len(cache) == 3
    assert [cache.owner(f"JOB00{n}") is not None for n in range(6)] == [
        False,
        False,
        True,
        False,
        True,
        True,
    ]
