"""The job catalog's limits, stated once: what a refusal says, and what ListJobTypes describes."""

from __future__ import annotations

import pytest

from shared import catalog
from shared.errors import InvalidArgument


@pytest.mark.parametrize(
    ("position", "message"),
    [
        (0, "argument 'position': must be between 1 and 1000000, got 0"),
        (-5, "argument 'position': must be between 1 and 1000000, got -5"),
        (1_000_001, "argument 'position': must be between 1 and 1000000, got 1000001"),
        (10**30, f"argument 'position': must be between 1 and 1000000, got {10**30}"),
        (-(10**400), "argument 'position': must be between 1 and 1000000, got -1000"),
    ],
)
def test_a_number_out_of_range_names_both_bounds(position: int, message: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        catalog.FIB.validate({"position": position})
    assert exc.value.message.startswith(message)


def test_one_sided_ranges_say_their_side() -> None:
    at_least = catalog.ArgSpec("n", catalog.ArgKind.INT, "", minimum=2)
    at_most = catalog.ArgSpec("n", catalog.ArgKind.FLOAT, "", maximum=2.5)
    with pytest.raises(InvalidArgument, match=r"^argument 'n': must be at least 2, got 1$"):
        at_least.validate(1)
    with pytest.raises(InvalidArgument, match=r"^argument 'n': must be at most 2.5, got 3$"):
        at_most.validate(3)
    assert catalog.WAIT.validate({"seconds": 86_400, "url": "http://h/"})["seconds"] == 86_400


@pytest.mark.parametrize(
    ("job", "name", "limit"),
    [(catalog.WAIT, "url", 2048), (catalog.EVAL, "expression", 4096)],
)
def test_each_string_argument_has_one_length_limit(
    job: catalog.JobSpec, name: str, limit: int
) -> None:
    spec = job.arg(name)
    assert spec.length_limit == limit
    assert spec.describe()["max_length"] == limit  # what ListJobTypes says
    prefix = "http://h/" if name == "url" else "1"
    longest = prefix + ("a" if name == "url" else " ") * (limit - len(prefix))
    assert spec.validate(longest) == longest  # the longest allowed passes
    for length in (limit + 1, 10_000):
        value = prefix + "a" * (length - len(prefix))
        with pytest.raises(InvalidArgument) as exc:
            spec.validate(value)
        assert exc.value.message == (
            f"argument '{name}': is {length} characters long; the most allowed is {limit}"
        )


def test_a_job_spec_finds_its_arguments_by_name() -> None:
    assert catalog.FIB.arg("position").maximum == catalog.MAX_FIB_POSITION
    with pytest.raises(KeyError):
        catalog.FIB.arg("nope")
