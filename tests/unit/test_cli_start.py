"""``workernator jobs start``: words that start with '-', expressions from files, numbers out of
range and oversized requests, against test_cli's fake JobService: what is sent, and what is
never sent.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner, Result

from shared import catalog
from tests.unit import test_cli as base
from tests.unit.test_cli import FakeService, assert_one_line_error, run
from workernator_api import cli, cli_format
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_api.limits import MAX_REQUEST_BYTES

# test_cli's fixtures: a CA and certificates, the fake over mTLS, the CLI's environment.
pki = base.pki
fake = base.fake
env = base.env

Env = dict[str, str | None]


def sent(service: FakeService) -> pb.StartJobRequest:
    request = service.requests[-1]
    assert isinstance(request, pb.StartJobRequest)
    return request


@pytest.mark.parametrize(
    ("args", "expression", "cpu_millis"),
    [
        (["-2^2"], "-2^2", 0),
        (["-2^2", "--cpu", "0.5"], "-2^2", 500),
        (["--cpu", "0.5", "-2^2"], "-2^2", 500),
        (["--cpu=0.5", "-x", "--var", "x=-2"], "-x", 500),
        (["-floor(2.5)"], "-floor(2.5)", 0),  # not -f with 'loor(2.5)'
        (["--", "--x"], "--x", 0),  # after '--' anything is the expression
        (["-.5", "-o", "json"], "-.5", 0),
    ],
)
def test_an_expression_may_start_with_a_dash(
    fake: tuple[FakeService, str], env: Env, args: list[str], expression: str, cpu_millis: int
) -> None:
    result = run(["jobs", "start", "eval", *args], env)
    assert result.exit_code == 0, result.output
    assert sent(fake[0]).eval.expression == expression
    assert sent(fake[0]).limits.cpu_millis == cpu_millis


def test_variables_keep_their_negative_values(fake: tuple[FakeService, str], env: Env) -> None:
    result = run(["jobs", "start", "eval", "-x - y", "--var", "x=-1", "--var=y=-2.5"], env)
    assert result.exit_code == 0, result.output
    assert dict(sent(fake[0]).eval.variables) == {"x": -1.0, "y": -2.5}


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "--frob", "1"],
        ["eval", "1", "--frob"],
        ["eval", "1", "--frob=2"],
        ["fib", "--frob", "3"],
        ["wait", "5", "http://h/", "--frob"],
    ],
)
def test_an_unknown_option_is_still_an_error_naming_it(
    fake: tuple[FakeService, str], env: Env, args: list[str]
) -> None:
    result = run(["jobs", "start", *args], env)
    assert result.exit_code == 2, result.output
    assert "No such option '--frob'" in result.stderr
    assert fake[0].requests == []


@pytest.mark.parametrize(
    "position", ["99999999999999999999999999", "18446744073709551616", "-5", "-1"]
)
def test_a_position_the_api_cannot_carry_is_refused_naming_the_range(
    fake: tuple[FakeService, str], env: Env, position: str
) -> None:
    result = run(["jobs", "start", "fib", position], env)
    assert_one_line_error(
        result, f"argument 'position': must be between 1 and 1000000, got {position}"
    )
    assert fake[0].requests == []


def test_a_position_with_a_thousand_digits_is_shown_cut(
    fake: tuple[FakeService, str], env: Env
) -> None:
    result = run(["jobs", "start", "fib", "9" * 1000], env)
    assert_one_line_error(result, "must be between 1 and 1000000, got 999", "(1000 characters)")
    assert len(result.stderr) < 200


def test_positions_the_api_carries_are_sent(fake: tuple[FakeService, str], env: Env) -> None:
    for position in ("2", "+3", "18446744073709551615"):
        run(["jobs", "start", "fib", position], env)
        assert sent(fake[0]).fib.position == int(position)
    assert run(["jobs", "start", "fib", "--", "-1"], env).exit_code == 1  # refused here


def test_an_expression_from_a_file_or_standard_input(
    fake: tuple[FakeService, str], env: Env, tmp_path: Path
) -> None:
    formula = tmp_path / "formula.txt"
    formula.write_bytes("\ufeff\n  2x *\n 3y  \n\n".encode())  # a byte order mark, too
    result = run(["jobs", "start", "eval", "-f", str(formula), "--var", "x=1", "--var", "y=2"], env)
    assert result.exit_code == 0, result.output
    assert sent(fake[0]).eval.expression == "2x *\n 3y"
    result = CliRunner().invoke(
        cli.cli, ["jobs", "start", "eval", "--file", "-"], env=env, input="-2^2\n"
    )
    assert result.exit_code == 0, result.output
    assert sent(fake[0]).eval.expression == "-2^2"


def test_bad_expression_files_are_one_line_errors_and_send_nothing(
    fake: tuple[FakeService, str], env: Env, tmp_path: Path
) -> None:
    files = {
        "empty": b"",
        "blank": b"\n \t\n",
        "long": b"1" + b" " * 4095 + b"+1",
        "latin1": "1 + caf\xe9".encode("latin-1"),
        "huge": b"1" * (MAX_REQUEST_BYTES + 1),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cases = {
        "missing": "cannot read the expression file {} (-f): No such file or directory",
        "empty": "the expression file {} (-f) is empty",
        "blank": "the expression file {} (-f) is empty (blanks only)",
        "long": "the expression in {} (-f) is 4098 characters long; the most allowed is 4096",
        "latin1": "the expression file {} (-f) is not UTF-8 text (byte 0xe9 at offset 7)",
        "huge": "the expression file {} (-f) is larger than 65536 bytes; an expression is at most "
        "4096 characters",
        ".": "cannot read the expression file {} (-f): Is a directory",
    }
    for name, message in cases.items():
        path = tmp_path / name
        result = run(["jobs", "start", "eval", "-f", str(path)], env)
        assert_one_line_error(result, message.format(path))
    stdin = CliRunner().invoke(cli.cli, ["jobs", "start", "eval", "-f", "-"], env=env, input="")
    assert_one_line_error(stdin, "standard input (-f -) is empty")
    assert fake[0].requests == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval"], "Missing argument 'EXPRESSION' (or -f FILE)."),
        (["eval", "1", "-f", "x"], "give EXPRESSION or -f FILE, not both"),
        (["eval", "-f"], "Option '-f' requires an argument"),
    ],
)
def test_eval_needs_one_expression(
    fake: tuple[FakeService, str], env: Env, args: list[str], message: str
) -> None:
    result: Result = run(["jobs", "start", *args], env)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert fake[0].requests == []


def test_an_oversized_request_is_refused_before_it_is_sent(
    fake: tuple[FakeService, str], env: Env
) -> None:
    many = [word for i in range(5000) for word in ("--var", f"variable_{i}=1")]
    result = run(["jobs", "start", "eval", "1", *many], env)
    request = pb.StartJobRequest(
        eval=pb.EvalArgs(expression="1", variables={f"variable_{i}": 1.0 for i in range(5000)})
    )
    assert_one_line_error(
        result,
        f"request too large: {request.ByteSize()} bytes, the api accepts at most 65536",
    )
    assert fake[0].requests == []


def test_grpcs_own_size_refusal_is_said_plainly(fake: tuple[FakeService, str], env: Env) -> None:
    fake[0].fail = (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Received message larger than max (2097165 vs. 1048576)",
    )
    result = run(["jobs", "list"], env)
    assert_one_line_error(result, "message too large: 2097165 bytes, at most 1048576 accepted")


def test_eval_help_states_the_catalogs_limit() -> None:
    text = " ".join(run(["jobs", "start", "eval", "--help"]).stdout.split())
    limit = catalog.EVAL.arg("expression").length_limit
    assert f"(-f FILE, -f - for standard input), at most {limit} characters" in text


def test_types_show_the_length_limits() -> None:
    info = pb.JobTypeInfo(
        name="wait",
        type=pb.JOB_TYPE_WAIT,
        title="Wait",
        args=[pb.ArgumentInfo(name="url", type="url", required=True, max_length=2048)],
    )
    text = cli_format.format_job_types([info]).splitlines()
    assert "    url (url, required, at most 2048 characters)" in text
