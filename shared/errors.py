"""Errors both processes agree on.

The runner answers every failed request with one of a small fixed set of codes (design section
4); the api maps them 1:1 to gRPC status codes. The message is for people: it says what was wrong.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    INTERNAL = "internal"


class WorkernatorError(Exception):
    """An error with a code from :class:`ErrorCode` and a message meant for the caller."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidArgument(WorkernatorError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFound(WorkernatorError):
    code = ErrorCode.NOT_FOUND


class FailedPrecondition(WorkernatorError):
    code = ErrorCode.FAILED_PRECONDITION


class ResourceExhausted(WorkernatorError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class Internal(WorkernatorError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[WorkernatorError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Internal,
    )
}


def error_from_code(code: ErrorCode, message: str) -> WorkernatorError:
    """Rebuild the typed error on the receiving side of the protocol."""
    return _BY_CODE[code](message)
