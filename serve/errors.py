"""Every failure leaves the server in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Statuses follow OpenAI's, because the SDK acts on them: it retries 408/409/429/5xx, so a bad request must never
be answered with a 5xx (it would be sent three times). Messages are one line naming the field and the value.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

log = logging.getLogger("serve.errors")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(self.body(), status_code=self.status, headers=_retry_after(self.status))


def _retry_after(status: int) -> dict[str, str] | None:
    return {"retry-after": "1"} if status == 429 else None


def invalid(param: str, value: Any, expected: str) -> APIError:
    """The standard 400: `Invalid value for 'temperature': 5.0 (expected a number in [0, 2])`."""
    return APIError(400, f"Invalid value for '{param}': {_show(value)} ({expected})", param=param, code="invalid_value")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_MISSING = object()
_PATH = re.compile(r"\s*-\s*at\s*`\$(?P<path>[^`]*)`\s*$")
_PATH_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def _walk(body: Any, parts: list[str | int]) -> Any:
    for part in parts:
        try:
            body = body[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return body


def from_validation(exc: ValidationException, raw_body: bytes | None) -> APIError:
    """Rewrite Litestar's msgspec error (`Expected float <= 2.0 - at $.data.temperature`) as one OpenAI 400."""
    cause = exc.__cause__
    text = str(cause) if isinstance(cause, msgspec.ValidationError) else str(exc.detail)
    match = _PATH.search(text)
    reason = _PATH.sub("", text).strip() if match else text
    if not match:  # e.g. a missing top-level field: "Object missing required field `messages`"
        missing = re.search(r"missing required field `([^`]+)`", reason)
        param = missing.group(1) if missing else None
        if param == "data":  # Litestar's name for the whole body: nothing was sent
            return APIError(400, "The request body is empty: send a JSON object", code="invalid_json")
        return APIError(400, f"{reason} in the request body" if param else reason, param=param,
                        code="missing_required_parameter" if param else None)
    parts = [m.group(1) if m.group(1) else int(m.group(2)) for m in _PATH_PART.finditer(match.group("path"))]
    if parts and parts[0] == "data":  # Litestar names the body `data`
        parts = parts[1:]
    param = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in parts).lstrip(".") or None
    missing = re.search(r"missing required field `([^`]+)`", reason)
    if missing:
        field = f"{param}.{missing.group(1)}" if param else missing.group(1)
        return APIError(400, f"Missing required parameter: '{field}'", param=field, code="missing_required_parameter")
    if param is None:
        return APIError(400, f"The request body must be a JSON object ({reason[0].lower() + reason[1:]})",
                        code="invalid_json")
    value = _MISSING
    if raw_body:
        try:
            value = _walk(json.loads(raw_body), parts)
        except ValueError:
            pass
    shown = f": {_show(value)}" if value is not _MISSING else ""
    return APIError(400, f"Invalid value for '{param}'{shown} ({reason[0].lower() + reason[1:]})", param=param,
                    code="invalid_value")


def _raw_body(request: Request) -> bytes | None:
    # Litestar caches the body it decoded on the connection state; exception handlers are synchronous and
    # cannot await `request.body()`. If a future Litestar moves it, the message merely loses the value.
    body = getattr(getattr(request, "_connection_state", None), "body", None)
    return body if isinstance(body, bytes) else None


def handle_api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


def handle_validation(request: Request, exc: ValidationException) -> Response:
    return from_validation(exc, _raw_body(request)).response()


def handle_http(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if status == 400 and "malformed" in str(exc.detail).lower():
        message = f"We could not parse the JSON body of your request: {exc.detail}"
        return APIError(400, message, code="invalid_json").response()
    if status == 401:
        return APIError(401, str(exc.detail), code="invalid_api_key").response()
    if status == 404:
        return APIError(404, f"Not found: {request.method} {request.url.path}", code="not_found").response()
    if status == 405:
        return APIError(405, f"Method {request.method} not allowed on {request.url.path}",
                        code="method_not_allowed").response()
    if status >= 500:
        log.error("server error on %s: %s", request.url.path, exc.detail)
    return APIError(status, str(exc.detail)).response()


def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return APIError(500, f"Internal server error: {type(exc).__name__}", type="server_error").response()


EXCEPTION_HANDLERS = {
    APIError: handle_api_error,
    ValidationException: handle_validation,
    HTTPException: handle_http,
    Exception: handle_unexpected,
}
