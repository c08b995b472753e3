"""OpenAI-shaped errors for every failure, and the ASGI middlewares that guard the API (request id and last-resort
errors, body size, API key).

Every error response is `{"error": {"message", "type", "param", "code"}}`, whatever raised it: our handlers, the
engine, pydantic validation (422 in FastAPI, 400 here, as OpenAI answers), an unknown route, or a bug (500, whose
message carries the request id; its traceback is logged under that id). Every response has an `x-request-id` header.
"""

from __future__ import annotations

import hmac
import json
import re
import uuid
from typing import Any

from absl import logging
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from novallm_jax.engine.engine import QueueFullError
from novallm_jax.errors import EngineUnavailableError, InvalidRequestError, NovaLLMError


class APIError(NovaLLMError):
    """An HTTP error to send as is: status, message, OpenAI `type`, and the offending `param` and `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @classmethod
    def from_exception(cls, e: Exception) -> "APIError":
        """The HTTP error of an exception from the SDK or engine (400 bad input, 503 full queue, else 500)."""
        if isinstance(e, APIError):
            return e
        if isinstance(e, QueueFullError):
            return cls(503, str(e), "server_overloaded", None, "queue_full")
        if isinstance(e, EngineUnavailableError):
            return cls(503, str(e), "service_unavailable", None, "engine_unavailable")
        if isinstance(e, InvalidRequestError):
            code = "context_length_exceeded" if "context" in str(e) else None
            return cls(400, str(e), "invalid_request_error", e.param, code)
        if isinstance(e, NovaLLMError):
            return cls(500, str(e), "server_error")
        return cls(500, "internal server error", "server_error")

    @classmethod
    def of_failed(cls, error: str | None) -> "APIError":
        """The HTTP error of a request the engine failed (`RequestOutput.error`): 503 when the engine became
        unavailable (a process of its cluster is gone), else 500."""
        if error and error.startswith(EngineUnavailableError.PREFIX):
            return cls.from_exception(EngineUnavailableError(error))
        return cls(500, f"generation failed: {error or 'internal error'}", "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return ErrorResponse(self.body(), status_code=self.status)


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote what the client sent, and text that holds a lone
    surrogate has no UTF-8 form (Starlette's JSONResponse would fail to encode it)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_STATUS_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
    503: ("server_overloaded", "overloaded"),
}


def _field_path(loc: tuple, field_names: frozenset[str]) -> list[str]:
    """A pydantic error location as field names and list indices only: union members' tags ("list[...]") and the
    client's own dict keys (which may be any text) are left out."""
    return [str(p) for p in loc if isinstance(p, int) or p in field_names]


def _validation_message(exc: RequestValidationError, field_names: frozenset[str]) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    # A union (prompt: str | list[str] | ...) reports one error per member: a bad text is the one that matters,
    # else the member that got furthest into the value ("content.0.type" over "content" for an image part).
    paths = [_field_path(tuple(e.get("loc", ())), field_names) for e in errors]
    index = next(
        (i for i, e in enumerate(errors) if e.get("type") == "invalid_text"),
        max(range(len(errors)), key=lambda i: (len(paths[i]), -i)),
    )
    first, loc = errors[index], paths[index]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = ".".join(loc) or None
    if first.get("type") == "invalid_text":
        return f"{param or 'a string'} {first['msg']}", (loc[0] if loc else None)
    if param is None and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return "the body must be a JSON object, sent with Content-Type: application/json", None
    where = f" at {param}" if param else ""
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{first.get('msg', 'invalid value')}{where}{more}", (loc[0] if loc else None)


def install_handlers(app: FastAPI, field_names: frozenset[str] = frozenset()) -> None:
    """Routes every exception to an OpenAI-shaped JSON response; `field_names`: the request bodies' field names."""

    def respond(request: Request, exc: Exception) -> JSONResponse:
        err = APIError.from_exception(exc)
        if err.status >= 500:  # ours, but a server fault: logged, and the message carries the request id
            rid = request_id(request.scope)
            # A traceback only where it helps: not for an overloaded or unavailable engine.
            logging.error(
                "request %s to %s failed: %s", rid, request.url.path, exc, exc_info=exc if err.status == 500 else None
            )
            err = APIError(err.status, f"{err.message} (request id {rid})", err.type, err.param, err.code)
        return err.response()

    app.add_exception_handler(APIError, respond)
    app.add_exception_handler(NovaLLMError, respond)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc, field_names)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        type_, code = _STATUS_TYPES.get(
            exc.status_code, ("invalid_request_error" if exc.status_code < 500 else "server_error", None)
        )
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 400 and "parsing the body" in message:
            message = "the body could not be parsed as JSON in UTF-8"
        return ErrorResponse(
            error_body(message, type_, None, code), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )


async def _send_json(send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body, ensure_ascii=True).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def request_id(scope) -> str:
    """The id of the request being served (set by `RequestIdMiddleware`)."""
    return scope.get("state", {}).get("request_id", "-")


def internal_error(rid: str) -> APIError:
    return APIError(500, f"internal server error (request id {rid}); the server logged the details", "server_error")


class RequestIdMiddleware:
    """Gives each request an id (the client's `x-request-id` if it is a plain token, else a new one), returns it
    in an `x-request-id` header, and turns any exception that escapes the app into an OpenAI-shaped 500 carrying
    it, the traceback logged under the same id. Sits outside every other middleware but the metrics.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers", ())).get(b"x-request-id", b"")
        rid = given.decode() if _CLIENT_REQUEST_ID.fullmatch(given) else f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = rid
        header = (b"x-request-id", rid.encode())
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logging.exception("request %s to %s failed", rid, scope.get("path"))
            if started:  # a response is under way: nothing valid can be sent any more; the client sees it cut
                return
            await _send_json(send, 500, internal_error(rid).body(), [header])


class BodyLimitMiddleware:
    """Reads the whole body before the app sees it, answering 413 once it passes `max_bytes` (before any parsing).

    The body is replayed to the app as one message; later `receive` calls go to the client, so that streaming
    responses still see `http.disconnect`.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(
            413, f"the request body is larger than the limit of {self.max_bytes} bytes", code="request_too_large"
        )
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, too_large.body(), [(b"connection", b"close")])
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_json(send, 413, too_large.body(), [(b"connection", b"close")])
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


_KEYED_PATHS = ("/tokenize", "/detokenize")


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1/*, /tokenize and /detokenize; /health, /metrics and the schema
    stay open."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"].startswith("/v1") or scope["path"] in _KEYED_PATHS):
            headers = dict(scope.get("headers", ()))
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = "missing API key" if not auth else "incorrect API key"
                return await _send_json(
                    send,
                    401,
                    error_body(message, "invalid_request_error", None, "invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")],
                )
        await self.app(scope, receive, send)
