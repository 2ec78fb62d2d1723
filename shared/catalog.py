"""The job catalog: the typed job types, their arguments, and argument validation.

The api validates arguments before it forwards a request (so the user gets a precise error
early) and the runner validates them again (it trusts nobody). Both use this module, so the two
can never disagree. :meth:`JobSpec.describe` is the machine-readable description the API serves.
"""

from __future__ import annotations

import enum
import math
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared import expr
from shared.errors import InvalidArgument

MAX_JOB_TYPE_LENGTH = 64
MAX_STRING_LENGTH = 4096  # the longest string argument, unless its spec says less
MAX_EXPRESSION_LENGTH = expr.MAX_LENGTH  # 4096, what the parser takes
MAX_URL_LENGTH = 2048
MAX_VARIABLES = 64


class ArgKind(enum.StrEnum):
    INT = "int"
    FLOAT = "float"
    STRING = "string"
    DURATION = "duration"  # seconds, as a float
    URL = "url"  # http or https
    EXPRESSION = "expression"  # an arithmetic expression, parsed by shared.expr
    VARIABLES = "map<string,float>"


@dataclass(frozen=True)
class ArgSpec:
    name: str
    kind: ArgKind
    description: str
    required: bool = True
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None  # of a string, URL or expression, in characters

    @property
    def length_limit(self) -> int:
        """The most characters a string argument may have: its own limit, or the default."""
        return self.max_length if self.max_length is not None else MAX_STRING_LENGTH

    def validate(self, value: object) -> Any:
        """Return the normalized value, or raise :class:`InvalidArgument` naming this argument."""
        try:
            return _VALIDATORS[self.kind](self, value)
        except InvalidArgument as exc:
            raise InvalidArgument(f"argument '{self.name}': {exc.message}") from None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.kind.value,
            "required": self.required,
            "description": self.description,
        }
        if self.minimum is not None:
            out["min"] = self.minimum
        if self.maximum is not None:
            out["max"] = self.maximum
        if self.max_length is not None:
            out["max_length"] = self.max_length
        return out


@dataclass(frozen=True)
class JobSpec:
    """A job type: its name, the title people see, and its typed arguments."""

    name: str
    title: str
    description: str
    args: tuple[ArgSpec, ...] = ()
    # A check across arguments, run after each argument validated on its own.
    check: Callable[[Mapping[str, Any]], None] | None = field(default=None, compare=False)

    def arg(self, name: str) -> ArgSpec:
        """The argument called ``name`` (KeyError when there is none)."""
        for spec in self.args:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def validate(self, args: Mapping[str, object]) -> dict[str, Any]:
        """Validate and normalize ``args``; raise :class:`InvalidArgument` saying what is wrong."""
        if not isinstance(args, Mapping):
            raise InvalidArgument(f"job '{self.name}': arguments must be a map")
        known = {a.name for a in self.args}
        unknown = sorted(str(k) for k in args if k not in known)
        if unknown:
            raise InvalidArgument(
                f"job '{self.name}' has no argument {', '.join(repr(u) for u in unknown)}"
                + (f" (it takes {', '.join(sorted(known))})" if known else " (it takes none)")
            )
        out: dict[str, Any] = {}
        for spec in self.args:
            if spec.name not in args or args[spec.name] is None:
                if spec.required:
                    raise InvalidArgument(f"argument '{spec.name}' is required")
                continue
            out[spec.name] = spec.validate(args[spec.name])
        if self.check is not None:
            self.check(out)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "args": [a.describe() for a in self.args],
        }


# --- validators, one per kind -----------------------------------------------------------------


def _number(spec: ArgSpec, value: object, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"must be {kind}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"must be a finite number, got {value}")
    too_small = spec.minimum is not None and value < spec.minimum
    too_large = spec.maximum is not None and value > spec.maximum
    if too_small or too_large:
        raise InvalidArgument(f"{range_text(spec)}, got {_fmt(value)}")
    return value


def range_text(spec: ArgSpec) -> str:
    """What a number argument must be, with both bounds when it has them: the same words for a
    value too small and too large, so the message always says what would be accepted."""
    low, high = spec.minimum, spec.maximum
    if low is not None and high is not None:
        return f"must be between {_fmt(low)} and {_fmt(high)}"
    if low is not None:
        return f"must be at least {_fmt(low)}"
    if high is not None:
        return f"must be at most {_fmt(high)}"
    return "must be a number"


def _fmt(x: float) -> str:
    if isinstance(x, int):
        return str(x)  # exactly, however large (an int does not always fit a float)
    return str(int(x)) if x.is_integer() else str(x)


def _int(spec: ArgSpec, value: object) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, float):
        raise InvalidArgument(f"must be a whole number, got {value}")
    return int(_number(spec, value, "an integer"))


def _float(spec: ArgSpec, value: object) -> float:
    return float(_number(spec, value, "a number"))


def _string(spec: ArgSpec, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"must be a string, got {type(value).__name__}")
    limit = spec.length_limit
    if len(value) > limit:
        raise InvalidArgument(f"is {len(value)} characters long; the most allowed is {limit}")
    return value


def _url(spec: ArgSpec, value: object) -> str:
    text = _string(spec, value)
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text):
        raise InvalidArgument("must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise InvalidArgument(f"is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidArgument(f"must be an http:// or https:// URL, got {text!r}")
    if "@" in parts.netloc:  # user info, even an empty one ("http://@host/")
        # The URL is not quoted back: it may hold a password.
        raise InvalidArgument("must not contain a user name or password")
    if not parts.hostname:
        raise InvalidArgument(f"has no host: {text!r}")
    if port == 0:
        raise InvalidArgument("port must be between 1 and 65535")
    return text


def _expression(spec: ArgSpec, value: object) -> str:
    text = _string(spec, value)
    try:
        expr.parse(text)
    except expr.ExpressionError as exc:
        raise InvalidArgument(str(exc)) from None
    return text


def _variables(spec: ArgSpec, value: object) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"must be a map of names to numbers, got {type(value).__name__}")
    if len(value) > MAX_VARIABLES:
        raise InvalidArgument(f"has more than {MAX_VARIABLES} variables")
    out: dict[str, float] = {}
    for name, number in value.items():
        if not isinstance(name, str) or not expr.is_valid_variable_name(name):
            raise InvalidArgument(
                f"{name!r} is not a valid variable name (letters, digits and _, not starting "
                "with a digit, at most 64 characters, not a function or constant name)"
            )
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise InvalidArgument(f"variable '{name}' must be a number")
        if not math.isfinite(number):
            raise InvalidArgument(f"variable '{name}' must be finite, got {number}")
        out[name] = float(number)
    return out


_VALIDATORS: dict[ArgKind, Callable[[ArgSpec, object], Any]] = {
    ArgKind.INT: _int,
    ArgKind.FLOAT: _float,
    ArgKind.DURATION: _float,
    ArgKind.STRING: _string,
    ArgKind.URL: _url,
    ArgKind.EXPRESSION: _expression,
    ArgKind.VARIABLES: _variables,
}


# --- the built-in job types -------------------------------------------------------------------

MAX_FIB_POSITION = 1_000_000  # about 0.7 s and 208,988 digits
MAX_WAIT_SECONDS = 86_400.0


def _check_eval(args: Mapping[str, Any]) -> None:
    parsed = expr.parse(args["expression"])
    missing = parsed.missing(args.get("variables", {}))
    if missing:
        names = ", ".join(f"'{m}'" for m in missing)
        raise InvalidArgument(
            f"argument 'variables': {'variable' if len(missing) == 1 else 'variables'} "
            f"{names} {'has' if len(missing) == 1 else 'have'} no value"
        )


NOOP = JobSpec("noop", "No-op", "Does nothing and prints nothing.")
FIB = JobSpec(
    "fib",
    "Fibonacci",
    "Prints the position-th Fibonacci number (1-indexed from 0: 1->0, 2->1, 3->1, 10->34).",
    (
        ArgSpec(
            "position",
            ArgKind.INT,
            "Position in the Fibonacci sequence, from 1",
            minimum=1,
            maximum=MAX_FIB_POSITION,
        ),
    ),
)
EVAL = JobSpec(
    "eval",
    "Evaluate",
    "Evaluates an arithmetic expression: + - * / % ^, parentheses, implicit multiplication "
    "(2x * 3y), functions (sqrt, sin, log, ...) and constants (pi, e, tau).",
    (
        ArgSpec(
            "expression",
            ArgKind.EXPRESSION,
            "The expression to evaluate",
            max_length=MAX_EXPRESSION_LENGTH,
        ),
        ArgSpec(
            "variables",
            ArgKind.VARIABLES,
            "Values of the variables the expression uses",
            required=False,
        ),
    ),
    check=_check_eval,
)
WAIT = JobSpec(
    "wait",
    "Wait",
    "Sleeps, then sends an empty HTTP POST to the URL and prints the response status.",
    (
        ArgSpec(
            "seconds",
            ArgKind.DURATION,
            "How long to wait before the request",
            minimum=0,
            maximum=MAX_WAIT_SECONDS,
        ),
        ArgSpec(
            "url", ArgKind.URL, "The http:// or https:// URL to POST to", max_length=MAX_URL_LENGTH
        ),
    ),
)

BUILTIN: Mapping[str, JobSpec] = {spec.name: spec for spec in (NOOP, FIB, EVAL, WAIT)}
