"""The api's health servicer: List agrees with Check, before and after a graceful shutdown.

(tests/e2e/test_clear_errors.py calls List on the real api over mTLS.)
"""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health_pb2

from workernator_api.server import NOT_SERVING, SERVING, HealthServicer


async def _listed(servicer: HealthServicer) -> dict[str, int]:
    response: Any = await servicer.List(health_pb2.HealthListRequest(), None)  # type: ignore[attr-defined, arg-type]
    return {name: status.status for name, status in response.statuses.items()}


async def _checked(servicer: HealthServicer, names: list[str]) -> dict[str, int]:
    out = {}
    for name in names:
        response = await servicer.Check(health_pb2.HealthCheckRequest(service=name), None)  # type: ignore[arg-type]
        out[name] = response.status
    return out


async def test_list_agrees_with_check_through_a_graceful_shutdown() -> None:
    servicer = HealthServicer()
    assert await _listed(servicer) == {"": SERVING}
    await servicer.set("workernator.v1.JobService", NOT_SERVING)
    await servicer.set("workernator.v1.JobService", SERVING)
    await servicer.set("other", NOT_SERVING)
    listed = await _listed(servicer)
    assert listed == {"": SERVING, "workernator.v1.JobService": SERVING, "other": NOT_SERVING}
    assert await _checked(servicer, list(listed)) == listed

    await servicer.enter_graceful_shutdown()
    await servicer.set("workernator.v1.JobService", SERVING)  # ignored from now on
    listed = await _listed(servicer)
    assert listed == dict.fromkeys(("", "workernator.v1.JobService", "other"), NOT_SERVING)
    assert await _checked(servicer, list(listed)) == listed
