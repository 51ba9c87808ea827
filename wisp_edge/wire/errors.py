"""The one error type both sides speak: an HTTP status, a stable machine-readable code and a reason.

Every refusal travels as ``{"error": {"message", "type", "code", ...}}`` (OpenAI's shape), with a
Retry-After header on 429/503, so a client can tell a bad request from an overload from a lost session.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ApiError(Exception):
    """A refusal with an HTTP status, a stable machine-readable code and a reason for humans."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after = retry_after
        self.extra = extra


def error_body(status: int, code: str, message: str, **extra: Any) -> dict:
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    return {"error": {"message": message, "type": kind, "code": code,
                      **{k: v for k, v in extra.items() if v is not None}}}


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str
    committed: int | None = None


class ErrorReply(BaseModel):
    """The body of every 4xx/5xx answer (documented in the OpenAPI schema)."""

    error: ErrorBody
