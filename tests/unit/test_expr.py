"""Tests for shared.expr: the eval job's expression parser and evaluator."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path
from typing import TypeAlias

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import expr
from shared.expr import (
    CONSTANTS,
    FUNCTIONS,
    MAX_DEPTH,
    MAX_LENGTH,
    MAX_TOKENS,
    EvaluationError,
    Expression,
    ExpressionError,
    format_number,
    is_valid_variable_name,
    parse,
)


def value(source: str, **values: float) -> float:
    return parse(source).evaluate(values)


# --- Results ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 + 2", 3.0),
        ("4 / 2", 2.0),
        ("2.3 * 0.2", 2.3 * 0.2),
        ("7", 7.0),
        ("  7\t\n", 7.0),
        (".5", 0.5),
        ("1.5", 1.5),
        ("1e3", 1000.0),
        ("1.5E-3", 0.0015),
        ("2e+2", 200.0),
        ("007", 7.0),
        # precedence and associativity
        ("1 + 2 * 3", 7.0),
        ("(1+2)*3", 9.0),
        ("2 * 3 ^ 2", 18.0),
        ("-2^2", -4.0),
        ("(-2)^2", 4.0),
        ("2^3^2", 512.0),
        ("(2^3)^2", 64.0),
        ("2^-1", 0.5),
        ("2^-1*3", 1.5),
        ("-2^-2", -0.25),
        ("10 - 4 - 3", 3.0),
        ("100 / 10 / 5", 2.0),
        ("7 % 4", 3.0),
        ("2 * 7 % 4", 2.0),  # (2 * 7) % 4: same level, left to right
        ("7 % 4 * 2", 6.0),
        ("1 - -1", 2.0),
        ("1 - +1", 0.0),
        ("--3", 3.0),
        ("-+-3", 3.0),
        ("2 * -3", -6.0),
        # Python's floored modulo: the result has the sign of the divisor
        ("-7 % 4", 1.0),
        ("7 % -4", -1.0),
        ("7.5 % 2", 1.5),
        # implicit multiplication
        ("2(3 + 1)", 8.0),
        ("(1 + 1)(2 + 1)", 6.0),
        ("2 (3)", 6.0),
        ("6 / 2(1 + 2)", 1.0),  # implicit binds tighter than "/": 6 / (2 * 3)
        ("2pi", 2 * math.pi),
        ("2 pi", 2 * math.pi),
        ("3sqrt(4)", 6.0),
        ("sqrt(4)(3)", 6.0),
        ("sqrt(4)sqrt(9)", 6.0),
        ("pi(2)", 2 * math.pi),  # a constant followed by "(" multiplies
        ("-2e", -2 * math.e),
        # the letter e: exponent only when digits follow
        ("2e3", 2000.0),
        ("2E3", 2000.0),
        ("2e", 2 * math.e),
        ("2e + 1", 2 * math.e + 1),
        ("2e+1", 20.0),
        ("2e-1", 0.2),
        ("e", math.e),
        ("e^2", math.e**2),
        # constants
        ("pi", math.pi),
        ("tau", math.tau),
        # functions
        ("sqrt(16)", 4.0),
        ("cbrt(-8)", -2.0),
        ("abs(-2.5)", 2.5),
        ("exp(0)", 1.0),
        ("exp(1)", math.e),
        ("ln(e)", 1.0),
        ("log(e^2)", 2.0),
        ("log(8, 2)", 3.0),
        ("log(100, 10)", 2.0),
        ("log2(1024)", 10.0),
        ("log10(1000)", 3.0),
        ("sin(0)", 0.0),
        ("cos(0)", 1.0),
        ("tan(0)", 0.0),
        ("asin(1)", math.pi / 2),
        ("acos(1)", 0.0),
        ("atan(1)", math.pi / 4),
        ("atan2(1, 1)", math.pi / 4),
        ("atan2(0, -1)", math.pi),
        ("sinh(0)", 0.0),
        ("cosh(0)", 1.0),
        ("tanh(0)", 0.0),
        ("floor(2.7)", 2.0),
        ("floor(-2.5)", -3.0),
        ("ceil(2.1)", 3.0),
        ("ceil(-2.5)", -2.0),
        ("round(2.5)", 3.0),  # halves away from zero, not to even
        ("round(-2.5)", -3.0),
        ("round(0.49999999999999994)", 0.0),
        ("round(2.4)", 2.0),
        ("min(3)", 3.0),
        ("min(3, 1, 2)", 1.0),
        ("max(3, 1, 2, 5, 4)", 5.0),
        ("hypot(3, 4)", 5.0),
        ("sqrt(2)^2", 2.0000000000000004),
        ("2 + max(1, 2 * 3) ^ 2", 38.0),
        ("min((1), (2))", 1.0),
        ("10^-400", 0.0),  # underflow is fine
        ("exp(-1000)", 0.0),
        ("0^0", 1.0),
        ("(-2)^3", -8.0),
        ("(-8)^(1/1)", -8.0),
    ],
)
def test_results(source: str, expected: float) -> None:
    assert value(source) == expected


@pytest.mark.parametrize(
    ("source", "values", "expected"),
    [
        ("2x * 3y", {"x": 2, "y": 1.5}, 18.0),
        ("2x^2", {"x": 3}, 18.0),  # 2 * (x ^ 2)
        ("-x^2", {"x": 3}, -9.0),
        ("-2x", {"x": 3}, -6.0),
        ("x(y + 1)", {"x": 2, "y": 3}, 8.0),  # x is not a function: x * (y + 1)
        ("(a + 1)(a - 1)", {"a": 3}, 8.0),
        ("2x2", {"x2": 4}, 8.0),  # names are greedy: 2 * x2
        ("2ex", {"ex": 4}, 8.0),  # 2 * ex, not 2e * x
        ("2e+x", {"x": 1}, 2 * math.e + 1),  # no digits after the sign: 2 * e + x
        ("2e3x", {"x": 2}, 4000.0),
        ("x y z", {"x": 2, "y": 3, "z": 4}, 24.0),
        ("1 / 2x", {"x": 4}, 0.125),  # 1 / (2 * x)
        ("foo(2)", {"foo": 5}, 10.0),  # not a function: foo * 2
        ("_a_1 + B", {"_a_1": 1, "B": 2}, 3.0),
        ("x", {"x": 3, "unused": 7}, 3.0),
        ("pi", {"pi": 3}, math.pi),  # constants cannot be overridden
        ("x + 1", {"x": 2**53}, 2.0**53),  # ints are accepted
    ],
)
def test_results_with_variables(source: str, values: dict[str, float], expected: float) -> None:
    assert parse(source).evaluate(values) == expected


# --- format_number ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "text"),
    [
        ("1 + 2", "3"),
        ("4 / 2", "2"),
        ("2.3 * 0.2", "0.46"),
        ("0.1 + 0.2", "0.3"),
        ("18.0", "18"),
        ("1 / 3", "0.333333333333333"),
        ("-0", "0"),
        ("0 * -1", "0"),
        ("-1.5", "-1.5"),
        ("1e20", "1e+20"),
        ("1e-7", "1e-07"),
        ("2^0.5", "1.4142135623731"),
    ],
)
def test_format_number(source: str, text: str) -> None:
    assert format_number(value(source)) == text


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_format_number_rejects_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="not a finite number"):
        format_number(bad)


# --- Canonical form -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "canonical"),
    [
        ("1 + 2", "(1 + 2)"),
        ("1+2*3", "(1 + (2 * 3))"),
        ("(1 + 2) * 3", "((1 + 2) * 3)"),
        ("((((1))))", "1"),
        ("-x", "(-x)"),
        ("+x", "(+x)"),
        ("--x", "(-(-x))"),
        ("-2^2", "(-(2 ^ 2))"),
        ("(-2)^2", "((-2) ^ 2)"),
        ("2^3^2", "(2 ^ (3 ^ 2))"),
        ("2^-1", "(2 ^ (-1))"),
        ("10 - 4 - 3", "((10 - 4) - 3)"),
        ("2x * 3y", "((2 * x) * (3 * y))"),
        ("2x^2", "(2 * (x ^ 2))"),
        ("(a+1)(a-1)", "((a + 1) * (a - 1))"),
        ("x(y + 1)", "(x * (y + 1))"),
        ("3sqrt(4)", "(3 * sqrt(4))"),
        ("sqrt(2)", "sqrt(2)"),
        ("atan2(y, -x)", "atan2(y, (-x))"),
        ("max(1,2,3)", "max(1, 2, 3)"),
        ("2pi + e", "((2 * pi) + e)"),
        ("2.30 * .5e1", "(2.30 * .5e1)"),  # numbers are kept as written
        ("1E3", "1E3"),
        ("7 % 4", "(7 % 4)"),
        ("6/2(1+2)", "(6 / (2 * (1 + 2)))"),
    ],
)
def test_str_is_canonical(source: str, canonical: str) -> None:
    assert str(parse(source)) == canonical
    assert str(parse(canonical)) == canonical


def test_expression_value_semantics() -> None:
    expression = parse("x + 1")
    assert expression == Expression("x + 1")
    assert hash(expression) == hash(Expression("x + 1"))
    assert expression != parse("x+1")  # compared by source
    assert expression.source == "x + 1"
    assert repr(expression) == "Expression(source='x + 1')"
    with pytest.raises(dataclasses.FrozenInstanceError):
        expression.source = "2"  # type: ignore[misc]
    with pytest.raises(ExpressionError):
        Expression("1 +")


# --- Variables ----------------------------------------------------------------------------------


def test_variables_exclude_constants_and_functions() -> None:
    expression = parse("x + y * z + pi + sqrt(x) + e + tau + 2e3 + y")
    assert expression.variables() == frozenset({"x", "y", "z"})
    assert expression.missing({"x": 1}) == ["y", "z"]
    assert expression.missing({"x": 1, "y": 2, "z": 3, "other": 4}) == []
    assert parse("1 + 2").variables() == frozenset()


def test_missing_variable_at_evaluate() -> None:
    with pytest.raises(ExpressionError) as caught:
        parse("1 + 2x").evaluate({})
    assert str(caught.value) == "no value for variable 'x' at position 5"
    assert caught.value.position == 5


def test_several_missing_variables_at_evaluate() -> None:
    with pytest.raises(ExpressionError) as caught:
        parse("b + a * b + c").evaluate({"c": 1})
    assert str(caught.value) == "no value for variables 'a', 'b' at position 0"
    assert caught.value.position == 0


def test_name_before_paren_that_is_not_a_function_is_a_variable() -> None:
    expression = parse("foo(2)")
    assert expression.missing({}) == ["foo"]
    with pytest.raises(ExpressionError, match="no value for variable 'foo' at position 0"):
        expression.evaluate({})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (math.inf, "value of 'x' is not a finite number"),
        (math.nan, "value of 'x' is not a finite number"),
        ("1", "value of 'x' is not a number"),
        (True, "value of 'x' is not a number"),
        (None, "value of 'x' is not a number"),
        (10**400, "value of 'x' is too large"),
    ],
)
def test_bad_variable_values(bad: object, message: str) -> None:
    with pytest.raises(EvaluationError) as caught:
        parse("x + 1").evaluate({"x": bad})  # type: ignore[dict-item]
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("x", True),
        ("_a1", True),
        ("Rate_2", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        ("1a", False),
        ("a-b", False),
        ("x y", False),
        ("é", False),
        ("x²", False),
        ("sqrt", False),
        ("log", False),
        ("pi", False),
        ("e", False),
        ("tau", False),
        ("E", True),
    ],
)
def test_is_valid_variable_name(name: str, valid: bool) -> None:
    assert is_valid_variable_name(name) is valid


def test_functions_and_constants_tables() -> None:
    required = {
        *("sqrt", "cbrt", "abs", "exp", "ln", "log", "log2", "log10"),
        *("sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh"),
        *("floor", "ceil", "round", "min", "max", "hypot"),
    }
    assert required <= set(FUNCTIONS)
    assert FUNCTIONS["log"].arity == (1, 2)
    assert FUNCTIONS["atan2"].arity == (2, 2)
    assert FUNCTIONS["hypot"].arity == (2, 2)
    assert FUNCTIONS["min"].arity == (1, None)
    assert FUNCTIONS["sqrt"].arity == (1, 1)
    assert dict(CONSTANTS) == {"pi": math.pi, "e": math.e, "tau": math.tau}
    with pytest.raises(TypeError):
        CONSTANTS["pi"] = 3  # type: ignore[index]


# --- Syntax errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message", "position"),
    [
        ("", "expression is empty", None),
        ("  \t ", "expression is empty", None),
        ("1 +", "unexpected end of expression at position 3", 3),
        ("1 + ", "unexpected end of expression at position 4", 4),
        ("-", "unexpected end of expression at position 1", 1),
        ("(1 + 2", "unclosed '(' at position 0", 0),
        ("2 * (1 + (2)", "unclosed '(' at position 4", 4),
        ("sqrt(2", "unclosed '(' at position 4", 4),
        ("(1 + 2))", "unexpected ')' at position 7", 7),
        (")", "unexpected ')' at position 0", 0),
        ("()", "unexpected ')' at position 1", 1),
        ("2 3", "unexpected number '3' at position 2", 2),
        ("(2) 3", "unexpected number '3' at position 4", 4),
        ("x 3", "unexpected number '3' at position 2", 2),
        ("(1 2)", "unexpected number '2' at position 3", 3),
        ("1.5.2", "unexpected number '.2' at position 3", 3),
        ("* 2", "unexpected '*' at position 0", 0),
        ("2 ** 3", "unexpected '*' at position 3", 3),
        ("2 ^ * 3", "unexpected '*' at position 4", 4),
        ("1, 2", "unexpected ',' at position 1", 1),
        ("(1, 2)", "unexpected ',' at position 2", 2),
        ("min(1,)", "unexpected ')' at position 6", 6),
        ("min(,1)", "unexpected ',' at position 4", 4),
        ("sqrt(1 2)", "unexpected number '2' at position 7", 7),
        ("2 $ 3", "unexpected character '$' at position 2", 2),
        ("x = 1", "unexpected character '=' at position 2", 2),
        ("2 \u00d7 3", "unexpected character '\u00d7' at position 2", 2),  # multiplication sign
        ("x²", "unexpected character '²' at position 1", 1),
        ("\u0661", "unexpected character '\u0661' at position 0", 0),  # Arabic-Indic digit
        ("a\x00", "unexpected character '\\x00' at position 1", 1),
        ("1.", "expected a digit after '.' at position 1", 1),
        (".", "expected a digit after '.' at position 0", 0),
        ("1.e5", "expected a digit after '.' at position 1", 1),
        ("1e999", "number '1e999' is too large at position 0", 0),
        ("9" * 400, f"number '{'9' * 17}...' is too large at position 0", 0),
        ("sqrt", "expected '(' after function 'sqrt' at position 4", 4),
        ("sqrt + 1", "expected '(' after function 'sqrt' at position 5", 5),
        ("2 sqrt", "expected '(' after function 'sqrt' at position 6", 6),
        ("sqrt(1, 2)", "function 'sqrt' takes 1 argument, got 2 at position 0", 0),
        ("1 + sqrt()", "function 'sqrt' takes 1 argument, got 0 at position 4", 4),
        ("atan2(1)", "function 'atan2' takes 2 arguments, got 1 at position 0", 0),
        ("hypot(1, 2, 3)", "function 'hypot' takes 2 arguments, got 3 at position 0", 0),
        ("log(1, 2, 3)", "function 'log' takes 1 or 2 arguments, got 3 at position 0", 0),
        ("log()", "function 'log' takes 1 or 2 arguments, got 0 at position 0", 0),
        ("max()", "function 'max' takes at least 1 argument, got 0 at position 0", 0),
        ("2 + " + "a" * 65, "name is longer than 64 characters at position 4", 4),
    ],
)
def test_syntax_errors(source: str, message: str, position: int | None) -> None:
    with pytest.raises(ExpressionError) as caught:
        parse(source)
    assert str(caught.value) == message
    assert caught.value.message == message
    assert caught.value.position == position
    assert isinstance(caught.value, ValueError)


# --- Evaluation errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("1 / 0", "division by zero"),
        ("1 / (2 - 2)", "division by zero"),
        ("0 / 0", "division by zero"),
        ("7 % 0", "modulo by zero"),
        ("7 % (1 - 1)", "modulo by zero"),
        ("10^10^10", "result is too large"),
        ("exp(1000)", "result is too large"),
        ("cosh(1000)", "result is too large"),
        ("sinh(-1000)", "result is too large"),
        ("1e308 * 10", "result is too large"),
        ("1e308 + 1e308", "result is too large"),
        ("-1e308 - 1e308", "result is too large"),
        ("1e308 / 1e-308", "result is too large"),
        ("(-10)^1001", "result is too large"),
        ("sqrt(-1)", "sqrt: math domain error"),
        ("ln(0)", "ln: math domain error"),
        ("log(-1)", "log: math domain error"),
        ("log(8, 1)", "log: math domain error"),
        ("log(8, 0)", "log: math domain error"),
        ("log2(0)", "log2: math domain error"),
        ("log10(-5)", "log10: math domain error"),
        ("asin(2)", "asin: math domain error"),
        ("acos(-1.5)", "acos: math domain error"),
        ("(-8)^(1/3)", "^: negative number raised to a fractional power"),
        ("0^-1", "^: zero raised to a negative power"),
        ("1 + sqrt(1 / 0)", "division by zero"),
    ],
)
def test_evaluation_errors(source: str, message: str) -> None:
    expression = parse(source)  # parses fine; only evaluation fails
    with pytest.raises(EvaluationError) as caught:
        expression.evaluate({})
    assert str(caught.value) == message
    assert isinstance(caught.value, ArithmeticError)


def test_runtime_division_by_zero_through_a_variable() -> None:
    with pytest.raises(EvaluationError, match=r"^division by zero$"):
        parse("1 / (x - 2)").evaluate({"x": 2})


# --- Limits -------------------------------------------------------------------------------------


def test_too_long() -> None:
    assert value("1" + " " * (MAX_LENGTH - 1)) == 1.0
    with pytest.raises(ExpressionError) as caught:
        parse("1" + " " * MAX_LENGTH)
    assert str(caught.value) == "expression is longer than 4096 characters"
    assert caught.value.position is None


def test_too_many_tokens() -> None:
    arguments = ",".join(["1"] * 511)
    at_limit = f"min({arguments})"  # 2 * 511 + 2 = 1024 tokens
    assert value(at_limit) == 1.0
    with pytest.raises(ExpressionError) as caught:
        parse("-" + at_limit)
    assert str(caught.value) == f"expression has more than {MAX_TOKENS} tokens at position 1026"
    assert caught.value.position == len(at_limit)


DEEP = f"expression is nested deeper than {MAX_DEPTH} levels"


@pytest.mark.parametrize(
    ("template", "position"),
    [
        ("({inner})", 64),  # parentheses: the 65th "("
        ("-{inner}", 64),  # signs: the 65th "-"
        ("sqrt({inner})", 324),  # calls: the 65th "(" (64 * len("sqrt(") + 4)
        ("1^{inner}", 129),  # right-associative powers: the 65th "^"
        ("-({inner})", 128),  # signs and parentheses each count once: the 65th "-"
    ],
)
def test_depth_limit(template: str, position: int) -> None:
    def nest(levels: int) -> str:
        source = "1"
        for _ in range(levels):
            source = template.format(inner=source)
        return source

    assert value(nest(MAX_DEPTH)) in (1.0, -1.0)
    with pytest.raises(ExpressionError) as caught:
        parse(nest(MAX_DEPTH + 1))
    assert str(caught.value) == f"{DEEP} at position {position}"
    assert caught.value.position == position


def test_left_associative_chains_count_towards_depth() -> None:
    at_limit = "1+" * MAX_DEPTH + "1"  # ((((1 + 1) + 1) ...) + 1): 64 levels
    assert value(at_limit) == MAX_DEPTH + 1
    with pytest.raises(ExpressionError) as caught:
        parse("1+" * (MAX_DEPTH + 1) + "1")
    assert str(caught.value) == f"{DEEP} at position 129"  # the 65th "+"


def test_depth_adds_up_across_constructs() -> None:
    # 40 signs around a chain of 30 additions: fine on their own, too deep together.
    source = "-" * 40 + "(" + "1+" * 30 + "1)"
    with pytest.raises(ExpressionError) as caught:
        parse(source)
    assert str(caught.value) == f"{DEEP} at position 90"  # the 25th "+": 40 + 25 > 64


@pytest.mark.parametrize(
    "source",
    [
        "(" * 4000,
        "(" * 4000 + "1" + ")" * 4000,  # too long and too deep
        "(" * 1000 + "1" + ")" * 1000,
        "-" * 4000 + "1",
        "-" * 1000 + "1",
        "2^" * 2000 + "2",
        "2^" * 500 + "2",
        "1+" * 2000 + "1",
        "sqrt(" * 800 + "1" + ")" * 800,
        "(-" * 2000,
        "((((1))))" * 400,
    ],
)
def test_pathological_input_is_rejected_cleanly_and_quickly(source: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ExpressionError):
        parse(source)
    assert time.perf_counter() - started < 0.5


def test_no_python_eval() -> None:
    code = Path(expr.__file__).read_text(encoding="utf-8")
    assert not re.search(r"\b(eval|exec|compile)\(", code)
    assert not re.search(r"^\s*(import|from)\s+ast\b", code, re.MULTILINE)


# --- Properties ---------------------------------------------------------------------------------

NEAR_EXPRESSIONS = st.text(alphabet="0123456789.eE+-*/%^(), xyzpisqrtminatn2_\t$", max_size=120)


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=80), NEAR_EXPRESSIONS))
def test_parse_never_fails_unexpectedly(source: str) -> None:
    """Anything either parses or raises ExpressionError; a parse evaluates to a finite float or
    raises EvaluationError."""
    try:
        expression = parse(source)
    except ExpressionError as error:
        assert error.position is None or 0 <= error.position <= len(source)
        return
    try:
        result = expression.evaluate(dict.fromkeys(expression.variables(), 1.5))
    except EvaluationError:
        return
    assert math.isfinite(result)


# A tree is a small integer or (operator, left, right, wrap in parentheses, implicit "*").
Tree: TypeAlias = int | tuple[str, "Tree", "Tree", bool, bool]

TREES: st.SearchStrategy[Tree] = st.recursive(
    st.integers(min_value=-20, max_value=20),
    lambda children: st.tuples(
        st.sampled_from("+-*"), children, children, st.booleans(), st.booleans()
    ),
    max_leaves=25,
)
PRECEDENCE = {"+": 1, "-": 1, "*": 2}


def _precedence(tree: Tree) -> int:
    return 3 if isinstance(tree, int) else PRECEDENCE[tree[0]]


def render(tree: Tree) -> str:
    """Source text for *tree* with only the parentheses its structure needs (plus extras)."""
    if isinstance(tree, int):
        return str(tree)
    operator, left, right, wrap, implicit = tree
    left_text, right_text = render(left), render(right)
    if _precedence(left) < PRECEDENCE[operator]:
        left_text = f"({left_text})"
    if _precedence(right) <= PRECEDENCE[operator]:  # left associative
        right_text = f"({right_text})"
    if operator == "*" and implicit:
        # implicit multiplication binds tighter than any binary operator: group the left side
        if not isinstance(left, int):
            left_text = f"({render(left)})"
        text = f"{left_text}({right_text})"
    else:
        text = f"{left_text} {operator} {right_text}"
    return f"({text})" if wrap else text


def canonical(tree: Tree) -> str:
    if isinstance(tree, int):
        return str(tree) if tree >= 0 else f"(-{-tree})"
    operator, left, right, _, _ = tree
    return f"({canonical(left)} {operator} {canonical(right)})"


def python_value(tree: Tree) -> float:
    """Python's own float arithmetic on the tree, in the same order."""
    if isinstance(tree, int):
        return float(tree)
    operator, left, right, _, _ = tree
    a, b = python_value(left), python_value(right)
    if operator == "+":
        return a + b
    if operator == "-":
        return a - b
    return a * b


@settings(max_examples=300)
@given(TREES)
def test_matches_python_arithmetic(tree: Tree) -> None:
    expression = parse(render(tree))
    assert str(expression) == canonical(tree)
    assert expression.evaluate({}) == python_value(tree)


LEAVES = st.sampled_from(
    ["0", "1", "2", "7", "0.5", ".25", "2.50", "1e2", "3E-1", "x", "y", "pi", "e", "tau"]
)


def _extend(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.builds("{}{}".format, st.sampled_from("+-"), children),
        st.builds(
            "{} {} {}".format, children, st.sampled_from(["+", "-", "*", "/", "%", "^"]), children
        ),
        st.builds("({})".format, children),
        st.builds("{}({})".format, children, children),
        st.builds("{} {}".format, children, st.sampled_from(["x", "y", "pi"])),
        st.builds(
            "{}({})".format, st.sampled_from(["sqrt", "abs", "sin", "ln", "round"]), children
        ),
        st.builds(
            "{}({}, {})".format,
            st.sampled_from(["min", "max", "atan2", "hypot", "log"]),
            children,
            children,
        ),
    )


EXPRESSIONS = st.recursive(LEAVES, _extend, max_leaves=12)


def _outcome(expression: Expression) -> float | str:
    try:
        return expression.evaluate({"x": 1.5, "y": -2.0})
    except EvaluationError as error:
        return f"error: {error}"


@settings(max_examples=300)
@given(EXPRESSIONS)
def test_str_round_trips(source: str) -> None:
    expression = parse(source)
    text = str(expression)
    again = parse(text)
    assert str(again) == text
    assert again.variables() == expression.variables()
    assert _outcome(again) == _outcome(expression)
