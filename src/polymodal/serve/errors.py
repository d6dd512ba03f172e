"""Every error the server sends, in OpenAI's envelope.

``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for anything the client
can fix, so that OpenAI's clients raise their usual exceptions (``BadRequestError``,
``NotFoundError``, ...) with a readable message. Where sending the same request again cannot
help, the response says ``x-should-retry: false``: the official client otherwise retries some
statuses (408, 409, 429, 5xx) on its own.

FastAPI's own errors (its 422 validation body, 404 and 405 for unknown routes) are replaced by
the handlers installed with :func:`install_handlers`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from polymodal.errors import InputError

log = logging.getLogger("polymodal.serve")

INVALID = "invalid_request_error"


class APIError(Exception):
    """An error for the client: ``status`` (4xx where the client can fix it), a message that
    names the field and the problem, the field as OpenAI writes it (``messages[0].content``)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = INVALID, retry: bool = False, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.retry = retry
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return envelope(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {**self.headers}
        if not self.retry:
            headers["x-should-retry"] = "false"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def envelope(message: str, type: str = INVALID, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_input_error(error: InputError, param: str | None = None) -> APIError:
    """A 400 for bad input found while reading it (a truncated image, audio that is not audio)."""
    return APIError(400, str(error), param=param or error.source, code="invalid_value")


def param_name(loc: Sequence[str | int]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``: the field as OpenAI
    names it. Pydantic's names for the branches of a union (``list[...]``, ``str``) and the tag of
    a tagged union's branch (``content[0].image_url.image_url`` is ``content[0].image_url``) are
    left out."""
    parts: list[str] = []
    previous: str | int | None = None
    for item in loc[1:] if loc and loc[0] in ("body", "query", "path", "header", "form") else loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif any(c in item for c in "[]()'-") or item in ("str", "int", "float", "bool", "dict", "list", "none"):
            continue  # a union branch's name, not a field
        elif item != previous:
            parts.append(("." if parts else "") + item)
        previous = item
    return "".join(parts) or None


CODES = {"missing": "missing_required_parameter", "json_invalid": "invalid_json", "extra_forbidden": "unknown_parameter"}


def validation_error(exc: RequestValidationError) -> APIError:
    """The deepest problem pydantic found, in words, naming the field: where a value matches no
    branch of a union, the branch it came closest to explains it best (an unknown audio format,
    not "content should be a string")."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = max(errors, key=lambda e: len(param_name(e.get("loc", ())) or ""))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON: " + str(first.get("ctx", {}).get("error", first["msg"])),
                        code="invalid_json")
    param = param_name(first.get("loc", ()))
    if param is None and kind in ("model_attributes_type", "model_type", "dict_type"):
        return APIError(400, "the request body must be a JSON object, sent as Content-Type: application/json",
                        code="invalid_json")
    if kind == "missing":
        message = f"missing required parameter: {param!r}" if param else "the request body is missing"
    else:
        same = [e["msg"].removeprefix("Value error, ") for e in errors if param_name(e.get("loc", ())) == param]
        explained = " or ".join(dict.fromkeys(same))
        message = f"invalid value for {param!r}: {explained}" if param else explained
    more = sum(param_name(e.get("loc", ())) != param for e in errors)
    if more:
        message += f" (and {more} more problem{'s' * (more > 1)})"
    return APIError(400, message, param=param, code=CODES.get(kind, "invalid_type" if "type" in kind else "invalid_value"))


def install_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's envelope: ours, FastAPI's validation and routing errors,
    bad input found deep in a model call, and (as a 500, logged) anything unexpected."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        return from_input_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message, code = f"unknown request URL: {request.method} {request.url.path}", "unknown_url"
        elif exc.status_code == 405:
            message, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        elif exc.status_code == 400 and "parsing the body" in str(exc.detail):
            message, code = ("the request body could not be parsed (not JSON or not UTF-8, nested too deeply, "
                             "or malformed multipart data)"), "invalid_body"
        else:
            message, code = str(exc.detail), None
        return APIError(exc.status_code, message, code=code, retry=exc.status_code >= 500,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error serving %s %s", request.method, request.url.path)
        return APIError(500, f"the server failed: {type(exc).__name__}", type="server_error", retry=True).response()
