"""A small, safe arithmetic expression language for the ``eval`` job.

The expression is parsed when a job is started, so syntax errors and variables without a value
are rejected before anything runs, and evaluated inside the job. Everything here is hand-written
on the standard library: Python's ``eval``, ``compile`` and ``ast`` are never used.

Grammar (EBNF, lowest precedence first)::

    expression = product { ("+" | "-") product } ;
    product    = term { ("*" | "/" | "%") term } ;
    term       = signed { power } ;  (* implicit multiplication: the power starts with a name
                                        or "(" *)
    signed     = ("+" | "-") signed | power ;
    power      = primary [ "^" signed ] ;
    primary    = NUMBER
               | CONSTANT
               | VARIABLE
               | FUNCTION "(" [ expression { "," expression } ] ")"
               | "(" expression ")" ;

    NUMBER     = ( digits [ "." digits ] | "." digits ) [ ("e" | "E") [ "+" | "-" ] digits ] ;
    NAME       = letter-or-underscore { letter-or-underscore | digit } ;   (* ASCII only *)

So ``+ -`` bind loosest and associate to the left; ``* / %`` come next, also to the left;
implicit multiplication binds tighter than they do, as in written mathematics (``6 / 2x`` is
``6 / (2 * x)``, ``2x * 3y`` is ``(2 * x) * (3 * y)``); signs come next (``-2x`` is
``(-2) * x``); ``^`` binds tightest and
associates to the right, and its exponent may carry a sign: ``-2^2`` is -4, ``2^3^2`` is 512,
``2^-1`` is 0.5, ``2x^2`` is ``2 * (x ^ 2)``. Whitespace between tokens is ignored.

Names. A name in ``FUNCTIONS`` must be followed by ``(`` and is a call; a name in ``CONSTANTS``
(``pi``, ``e``, ``tau``) is that constant; any other name is a variable whose value is supplied at
evaluation time. Names are case-sensitive and at most ``MAX_NAME_LENGTH`` characters long.

Implicit multiplication. An operand (number, name, call or parenthesised group) directly followed
by a name or by ``(`` is multiplied by it: ``2x``, ``2(x + 1)``, ``(a + 1)(a - 1)``, ``2pi``,
``3sqrt(4)``. A name that is not a function followed by ``(`` is therefore a multiplication, not a
call: ``x(y + 1)`` is ``x * (y + 1)`` and ``foo(2)`` is ``foo * 2`` with a variable ``foo``. A
number directly followed by another number (``2 3``, ``(2) 3``) is a syntax error.

Numbers and the letter ``e``. A number is scanned greedily, and an ``e`` or ``E`` right after its
digits is an exponent only when digits (optionally after one sign) follow it: ``2e3`` is 2000 and
``1.5E-3`` is 0.0015, but ``2e`` is ``2 * e``, ``2e+x`` is ``2 * e + x`` and ``2ex`` is ``2 * ex``.
Names are also scanned greedily, so ``2x2`` is ``2 * x2``. ``1.`` and a lone ``.`` are errors.

Semantics. All arithmetic is on Python floats, so the cost of every step is bounded. ``%`` is
Python's floored modulo (the result has the sign of the divisor: ``-7 % 4`` is 1, ``7 % -4`` is
-1), not ``math.fmod``. ``round`` rounds halves away from zero. Division or modulo by zero, a
result too large for a float (``10^10^10``, ``exp(1000)``) and a math domain error
(``sqrt(-1)``, ``ln(0)``, ``(-8)^(1/3)``) raise ``EvaluationError``; infinity and NaN are never
returned.

Limits. Source is at most ``MAX_LENGTH`` characters and ``MAX_TOKENS`` tokens. The syntax tree is
at most ``MAX_DEPTH`` levels deep, where every operator, sign and function call is one level above
its operands (so a chain ``a + b + c`` of left-associative operators is nested too: it is
``((a + b) + c)``), and at most ``MAX_DEPTH`` parentheses may be open at any point. Depth is checked
while parsing, so neither parsing nor evaluation ever recurses more than a few hundred frames.

``str(expression)`` is a canonical, fully parenthesised form such as ``((2 * x) + (-y))`` that
parses back to the same tree (for large expressions it can exceed the length or token limits).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from types import MappingProxyType
from typing import NamedTuple, TypeAlias, assert_never

__all__ = [
    "CONSTANTS",
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_TOKENS",
    "EvaluationError",
    "Expression",
    "ExpressionError",
    "Function",
    "format_number",
    "is_valid_variable_name",
    "parse",
]

MAX_LENGTH: int = 4096
"""Most characters an expression's source may have."""

MAX_TOKENS: int = 1024
"""Most tokens (numbers, names, operators, parentheses, commas) an expression may have."""

MAX_DEPTH: int = 64
"""Deepest nesting of the syntax tree, and most parentheses open at once."""

MAX_NAME_LENGTH: int = 64
"""Longest name (variable, function or constant) in characters."""


# --- Errors -------------------------------------------------------------------------------------


class ExpressionError(ValueError):
    """The expression is malformed, too big, or uses a variable that has no value.

    ``position`` is the 0-based index in the source the error refers to, or ``None`` when it
    concerns the expression as a whole. The message already says where.
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


class EvaluationError(ArithmeticError):
    """Evaluation failed: division or modulo by zero, overflow, or a math domain error."""


def _syntax_error(what: str, position: int) -> ExpressionError:
    """An ``ExpressionError`` saying *what* is wrong, followed by where."""
    return ExpressionError(f"{what} at position {position}", position)


# --- Functions and constants --------------------------------------------------------------------


class Function(NamedTuple):
    """A callable function: ``arity`` is (fewest, most) arguments, most ``None`` if unbounded."""

    arity: tuple[int, int | None]
    implementation: Callable[..., float]


def _round_half_away_from_zero(x: float) -> float:
    # x - floor(x) is exact for floats, so the comparison with 0.5 is exact too.
    magnitude = abs(x)
    whole = math.floor(magnitude)
    rounded = whole + 1 if magnitude - whole >= 0.5 else whole
    return math.copysign(float(rounded), x)


def _log(x: float, base: float | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


def _minimum(*xs: float) -> float:
    return min(xs)


def _maximum(*xs: float) -> float:
    return max(xs)


def _floor(x: float) -> float:
    return float(math.floor(x))


def _ceil(x: float) -> float:
    return float(math.ceil(x))


_ONE = (1, 1)
_TWO = (2, 2)

FUNCTIONS: Mapping[str, Function] = MappingProxyType(
    {
        "sqrt": Function(_ONE, math.sqrt),
        "cbrt": Function(_ONE, math.cbrt),
        "abs": Function(_ONE, math.fabs),
        "exp": Function(_ONE, math.exp),
        "ln": Function(_ONE, math.log),
        "log": Function((1, 2), _log),
        "log2": Function(_ONE, math.log2),
        "log10": Function(_ONE, math.log10),
        "sin": Function(_ONE, math.sin),
        "cos": Function(_ONE, math.cos),
        "tan": Function(_ONE, math.tan),
        "asin": Function(_ONE, math.asin),
        "acos": Function(_ONE, math.acos),
        "atan": Function(_ONE, math.atan),
        "atan2": Function(_TWO, math.atan2),
        "sinh": Function(_ONE, math.sinh),
        "cosh": Function(_ONE, math.cosh),
        "tanh": Function(_ONE, math.tanh),
        "floor": Function(_ONE, _floor),
        "ceil": Function(_ONE, _ceil),
        "round": Function(_ONE, _round_half_away_from_zero),
        "min": Function((1, None), _minimum),
        "max": Function((1, None), _maximum),
        "hypot": Function(_TWO, math.hypot),
    }
)
"""Callable functions by name. ``log(x)`` is the natural log, ``log(x, b)`` the log to base b."""

CONSTANTS: Mapping[str, float] = MappingProxyType({"pi": math.pi, "e": math.e, "tau": math.tau})
"""Named constants; they cannot be given values."""


def is_valid_variable_name(name: str) -> bool:
    """Whether *name* can be a variable: an ASCII name of at most 64 characters that is not the
    name of a function or constant."""
    return (
        0 < len(name) <= MAX_NAME_LENGTH
        and name[0] in _NAME_START
        and all(ch in _NAME_CHARS for ch in name)
        and name not in FUNCTIONS
        and name not in CONSTANTS
    )


def format_number(x: float) -> str:
    """Format a result for people: 15 significant digits, no trailing zeros, no ``-0``.

    ``2.3 * 0.2`` gives ``0.46``, ``4 / 2`` gives ``2``, ``1e20`` gives ``1e+20``.
    """
    if not math.isfinite(x):
        raise ValueError(f"cannot format {x!r}: not a finite number")
    if x == 0:
        x = 0.0  # turns -0.0 into 0.0
    return format(x, ".15g")


# --- Tokenizer ----------------------------------------------------------------------------------

_DIGITS = frozenset(string.digits)
_NAME_START = frozenset(string.ascii_letters + "_")
_NAME_CHARS = _NAME_START | _DIGITS
_OPERATORS = frozenset("+-*/%^")


class _Kind(Enum):
    NUMBER = "number"
    NAME = "name"
    OPERATOR = "operator"
    LEFT = "("
    RIGHT = ")"
    COMMA = ","
    END = "end"


_PUNCTUATION = {"(": _Kind.LEFT, ")": _Kind.RIGHT, ",": _Kind.COMMA}


@dataclass(frozen=True)
class _Token:
    kind: _Kind
    text: str
    position: int

    def describe(self) -> str:
        """How the token is named in an error message."""
        text = self.text if len(self.text) <= 20 else self.text[:17] + "..."
        if self.kind is _Kind.END:
            return "end of expression"
        if self.kind is _Kind.NUMBER:
            return f"number '{text}'"
        if self.kind is _Kind.NAME:
            return f"name '{text}'"
        return f"'{text}'"


def _skip_digits(source: str, index: int) -> int:
    while index < len(source) and source[index] in _DIGITS:
        index += 1
    return index


def _scan_number(source: str, start: int) -> int:
    """Return the end of the number starting at *start* (a digit or ``.``)."""
    index = _skip_digits(source, start)
    if index < len(source) and source[index] == ".":
        fraction_end = _skip_digits(source, index + 1)
        if fraction_end == index + 1:
            raise _syntax_error("expected a digit after '.'", index)
        index = fraction_end
    if index < len(source) and source[index] in "eE":
        digits_start = index + 1
        if digits_start < len(source) and source[digits_start] in "+-":
            digits_start += 1
        exponent_end = _skip_digits(source, digits_start)
        if exponent_end > digits_start:  # otherwise the "e" starts a name, e.g. the constant e
            index = exponent_end
    return index


def _scan_name(source: str, start: int) -> int:
    index = start + 1
    while index < len(source) and source[index] in _NAME_CHARS:
        index += 1
    return index


def _tokenize(source: str) -> list[_Token]:
    """Split *source* into tokens, ending with an END token at ``len(source)``."""
    tokens: list[_Token] = []
    index = 0
    while index < len(source):
        char = source[index]
        if char.isspace():
            index += 1
            continue
        start = index
        if char in _DIGITS or char == ".":
            kind, index = _Kind.NUMBER, _scan_number(source, start)
        elif char in _NAME_START:
            kind, index = _Kind.NAME, _scan_name(source, start)
            if index - start > MAX_NAME_LENGTH:
                raise _syntax_error(f"name is longer than {MAX_NAME_LENGTH} characters", start)
        elif char in _OPERATORS:
            kind, index = _Kind.OPERATOR, start + 1
        elif char in _PUNCTUATION:
            kind, index = _PUNCTUATION[char], start + 1
        else:
            raise _syntax_error(f"unexpected character {char!r}", start)
        if len(tokens) == MAX_TOKENS:
            raise _syntax_error(f"expression has more than {MAX_TOKENS} tokens", start)
        tokens.append(_Token(kind, source[start:index], start))
    tokens.append(_Token(_Kind.END, "", len(source)))
    return tokens


# --- Syntax tree --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    text: str  # as written in the source
    value: float

    @property
    def depth(self) -> int:
        return 0


@dataclass(frozen=True)
class Constant:
    name: str

    @property
    def depth(self) -> int:
        return 0


@dataclass(frozen=True)
class Variable:
    name: str
    position: int = field(compare=False)

    @property
    def depth(self) -> int:
        return 0


@dataclass(frozen=True)
class Unary:
    operator: str  # "+" or "-"
    operand: Node

    @cached_property
    def depth(self) -> int:
        return 1 + self.operand.depth


@dataclass(frozen=True)
class Binary:
    operator: str  # "+", "-", "*", "/", "%" or "^"; implicit multiplication is "*"
    left: Node
    right: Node

    @cached_property
    def depth(self) -> int:
        return 1 + max(self.left.depth, self.right.depth)


@dataclass(frozen=True)
class Call:
    name: str
    arguments: tuple[Node, ...]

    @cached_property
    def depth(self) -> int:
        return 1 + max((argument.depth for argument in self.arguments), default=0)


Node: TypeAlias = Number | Constant | Variable | Unary | Binary | Call


# --- Parser -------------------------------------------------------------------------------------

# Binding powers: how tightly an operator holds its left operand. A right operand is parsed with
# the operator's own power (left associative) or one less (right associative, for "^").
_SUM = 10
_PRODUCT = 20
_IMPLICIT = 25  # implicit multiplication binds tighter than * / %: 6 / 2x is 6 / (2 * x)
_SIGN = 30
_POWER = 40
_BINDING_POWER = {"+": _SUM, "-": _SUM, "*": _PRODUCT, "/": _PRODUCT, "%": _PRODUCT, "^": _POWER}


class _Parser:
    """A Pratt parser over the token list that enforces ``MAX_DEPTH`` as it goes."""

    def __init__(self, source: str) -> None:
        self._tokens = _tokenize(source)
        self._index = 0
        self._ancestors = 0  # operators and calls enclosing the current position
        self._open_parens = 0

    def parse(self) -> Node:
        if self._peek().kind is _Kind.END:
            raise ExpressionError("expression is empty")
        node = self._expression(0)
        token = self._peek()
        if token.kind is not _Kind.END:
            raise self._unexpected(token)
        return node

    # Token access.

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _advance(self) -> _Token:
        token = self._tokens[self._index]
        self._index += 1
        return token

    @staticmethod
    def _unexpected(token: _Token) -> ExpressionError:
        return _syntax_error(f"unexpected {token.describe()}", token.position)

    # Depth bookkeeping.

    @staticmethod
    def _too_deep(position: int) -> ExpressionError:
        return _syntax_error(f"expression is nested deeper than {MAX_DEPTH} levels", position)

    def _operand(self, min_power: int, operator: _Token) -> Node:
        """Parse the operand of *operator*, one level further down the tree."""
        if self._ancestors + 1 > MAX_DEPTH:
            raise self._too_deep(operator.position)
        self._ancestors += 1
        node = self._expression(min_power)
        self._ancestors -= 1
        return node

    def _open(self, paren: _Token) -> None:
        if self._open_parens + 1 > MAX_DEPTH:
            raise self._too_deep(paren.position)
        self._open_parens += 1

    def _close(self, paren: _Token) -> None:
        token = self._peek()
        if token.kind is _Kind.END:
            raise _syntax_error("unclosed '('", paren.position)
        if token.kind is not _Kind.RIGHT:
            raise self._unexpected(token)
        self._advance()
        self._open_parens -= 1

    def _checked(self, node: Node, token: _Token) -> Node:
        """Return *node*, built at *token*, unless it makes the tree too deep."""
        if self._ancestors + node.depth > MAX_DEPTH:
            raise self._too_deep(token.position)
        return node

    # Grammar.

    def _expression(self, min_power: int) -> Node:
        """Parse operators binding tighter than *min_power*, the heart of the Pratt parser."""
        left = self._prefix()
        while True:
            token = self._peek()
            if token.kind is _Kind.OPERATOR:
                power = _BINDING_POWER[token.text]
                if power <= min_power:
                    return left
                self._advance()
                right_power = power - 1 if token.text == "^" else power
                right = self._operand(right_power, token)
                left = self._checked(Binary(token.text, left, right), token)
            elif token.kind in (_Kind.NAME, _Kind.LEFT):
                if min_power >= _IMPLICIT:
                    return left
                right = self._operand(_IMPLICIT, token)  # implicit multiplication
                left = self._checked(Binary("*", left, right), token)
            else:
                return left

    def _prefix(self) -> Node:
        """Parse what can start an operand: a number, name, call, group or sign."""
        token = self._advance()
        if token.kind is _Kind.NUMBER:
            value = float(token.text)
            if math.isinf(value):
                raise _syntax_error(f"{token.describe()} is too large", token.position)
            return Number(token.text, value)
        if token.kind is _Kind.NAME:
            if token.text in FUNCTIONS:
                return self._call(token)
            if token.text in CONSTANTS:
                return Constant(token.text)
            return Variable(token.text, token.position)
        if token.kind is _Kind.LEFT:
            self._open(token)
            node = self._expression(0)
            self._close(token)
            return node
        if token.kind is _Kind.OPERATOR and token.text in "+-":
            operand = self._operand(_SIGN, token)
            return self._checked(Unary(token.text, operand), token)
        raise self._unexpected(token)

    def _call(self, name: _Token) -> Node:
        """Parse the parenthesised arguments of the function *name*."""
        paren = self._peek()
        if paren.kind is not _Kind.LEFT:
            raise _syntax_error(f"expected '(' after function '{name.text}'", paren.position)
        self._advance()
        self._open(paren)
        arguments: list[Node] = []
        if self._peek().kind is not _Kind.RIGHT:
            arguments.append(self._operand(0, name))
            while self._peek().kind is _Kind.COMMA:
                self._advance()
                arguments.append(self._operand(0, name))
        self._close(paren)
        _check_arity(name, len(arguments))
        return self._checked(Call(name.text, tuple(arguments)), name)


def _check_arity(name: _Token, count: int) -> None:
    fewest, most = FUNCTIONS[name.text].arity
    if fewest <= count and (most is None or count <= most):
        return
    if most is None:
        expected = f"at least {fewest}"
    elif fewest == most:
        expected = f"{fewest}"
    else:
        expected = f"{fewest} or {most}" if most == fewest + 1 else f"{fewest} to {most}"
    noun = "argument" if (most if most is not None else fewest) == 1 else "arguments"
    raise _syntax_error(
        f"function '{name.text}' takes {expected} {noun}, got {count}", name.position
    )


# --- Evaluation ---------------------------------------------------------------------------------


def _finite(result: float, name: str) -> float:
    """Return *result* unless it is infinite (overflow) or NaN (a domain error in *name*)."""
    if math.isinf(result):
        raise EvaluationError("result is too large")
    if math.isnan(result):
        raise EvaluationError(f"{name}: math domain error")
    return result


def _power(base: float, exponent: float) -> float:
    if base == 0 and exponent < 0:
        raise EvaluationError("^: zero raised to a negative power")
    if base < 0 and not exponent.is_integer():
        raise EvaluationError("^: negative number raised to a fractional power")
    try:
        return math.pow(base, exponent)
    except OverflowError:
        raise EvaluationError("result is too large") from None


def _apply(operator: str, left: float, right: float) -> float:
    match operator:
        case "+":
            result = left + right
        case "-":
            result = left - right
        case "*":
            result = left * right
        case "/":
            if right == 0:
                raise EvaluationError("division by zero")
            result = left / right
        case "%":
            if right == 0:
                raise EvaluationError("modulo by zero")
            result = left % right
        case "^":
            result = _power(left, right)
        case _:
            raise AssertionError(f"unknown operator {operator!r}")
    return _finite(result, operator)


def _call(name: str, arguments: list[float]) -> float:
    try:
        result = FUNCTIONS[name].implementation(*arguments)
    except OverflowError:
        raise EvaluationError("result is too large") from None
    except (ValueError, ZeroDivisionError):
        raise EvaluationError(f"{name}: math domain error") from None
    return _finite(result, name)


def _evaluate(node: Node, values: Mapping[str, float]) -> float:
    match node:
        case Number(value=value):
            return value
        case Constant(name=name):
            return CONSTANTS[name]
        case Variable(name=name):
            return values[name]
        case Unary(operator=operator, operand=operand):
            value = _evaluate(operand, values)
            return -value if operator == "-" else value
        case Binary(operator=operator, left=left, right=right):
            return _apply(operator, _evaluate(left, values), _evaluate(right, values))
        case Call(name=name, arguments=arguments):
            return _call(name, [_evaluate(argument, values) for argument in arguments])
        case _:
            assert_never(node)


def _render(node: Node) -> str:
    match node:
        case Number(text=text):
            return text
        case Constant(name=name) | Variable(name=name):
            return name
        case Unary(operator=operator, operand=operand):
            return f"({operator}{_render(operand)})"
        case Binary(operator=operator, left=left, right=right):
            return f"({_render(left)} {operator} {_render(right)})"
        case Call(name=name, arguments=arguments):
            return f"{name}({', '.join(_render(argument) for argument in arguments)})"
        case _:
            assert_never(node)


def _variables(node: Node) -> Iterator[Variable]:
    """The variable nodes under *node*, in source order."""
    match node:
        case Variable():
            yield node
        case Unary(operand=operand):
            yield from _variables(operand)
        case Binary(left=left, right=right):
            yield from _variables(left)
            yield from _variables(right)
        case Call(arguments=arguments):
            for argument in arguments:
                yield from _variables(argument)
        case Number() | Constant():
            pass
        case _:
            assert_never(node)


def _number_value(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EvaluationError(f"value of '{name}' is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise EvaluationError(f"value of '{name}' is too large") from None
    if not math.isfinite(number):
        raise EvaluationError(f"value of '{name}' is not a finite number")
    return number


# --- Public interface ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Expression:
    """A parsed expression. ``Expression(source)`` parses, like ``parse(source)``, and raises
    ``ExpressionError`` if *source* is not a valid expression."""

    source: str
    _root: Node = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise TypeError(f"expression source must be a str, not {type(self.source).__name__}")
        if len(self.source) > MAX_LENGTH:
            raise ExpressionError(f"expression is longer than {MAX_LENGTH} characters")
        object.__setattr__(self, "_root", _Parser(self.source).parse())

    def variables(self) -> frozenset[str]:
        """The names of the variables used (constants and functions are not variables)."""
        return frozenset(variable.name for variable in _variables(self._root))

    def missing(self, values: Mapping[str, float]) -> list[str]:
        """The sorted names of variables used but not given in *values*."""
        return sorted(self.variables() - values.keys())

    def evaluate(self, values: Mapping[str, float]) -> float:
        """Evaluate with *values* for the variables (extra values are ignored).

        Raises ``ExpressionError`` if a variable has no value, and ``EvaluationError`` if the
        arithmetic fails (a value that is not a finite number counts as failing). The result is
        always a finite float.
        """
        missing = [v for v in _variables(self._root) if v.name not in values]
        if missing:
            names = sorted({variable.name for variable in missing})
            listed = ", ".join(f"'{name}'" for name in names)
            noun = "variable" if len(names) == 1 else "variables"
            raise _syntax_error(f"no value for {noun} {listed}", missing[0].position)
        resolved = {name: _number_value(name, values[name]) for name in self.variables()}
        return _evaluate(self._root, resolved)

    def __str__(self) -> str:
        """The canonical, fully parenthesised form, e.g. ``((2 * x) + (-y))``."""
        return _render(self._root)


def parse(source: str) -> Expression:
    """Parse *source*, raising ``ExpressionError`` with a position if it is not valid."""
    return Expression(source)
