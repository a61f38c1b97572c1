"""Request bodies, read within a size limit: raw bytes, and multipart forms for uploads."""

from __future__ import annotations

import logging
from typing import AsyncGenerator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest

from .errors import ApiError, bad_request

Form = dict[str, "str | bytes"]  # a field's text, or a file's bytes

# The parser logs a warning for each malformed body it meets: anyone could fill the log with them.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The request body, refusing to buffer more than ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
    except ClientDisconnect:
        # The client hung up mid-body. The answer reaches nobody; it only ends the request.
        raise ApiError(400, "The request body ended before its declared length.", code="incomplete_body") from None
    return bytes(body)


async def read_form(request: HttpRequest, limit: int, fields: tuple[str, ...], files: tuple[str, ...]) -> Form:
    """A ``multipart/form-data`` body of at most ``limit`` bytes holding only ``fields`` (text)
    and ``files``; each at most once. Raises ApiError (400 or 413) naming what is wrong."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("Send this request as multipart/form-data.", code="invalid_content_type")
    body = await read_body(request, limit)

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(
        request.headers, stream(), max_files=len(files) + 1, max_fields=len(fields) + 1, max_part_size=max(64 * 1024, limit)
    )
    try:
        parsed = await parser.parse()
    except MultiPartException as exc:
        raise bad_request(f"The form could not be read: {exc.message}", code="invalid_form") from None
    form: Form = {}
    try:
        for key, value in parsed.multi_items():
            if key not in fields + files:
                raise bad_request(f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter")
            if key in form:
                raise bad_request(f"'{key}' is given more than once.", param=key)
            if key in files:
                if not isinstance(value, UploadFile):
                    raise bad_request(f"'{key}' must be a file.", param=key, code="invalid_type")
                form[key] = await value.read()
            else:
                if not isinstance(value, str):
                    raise bad_request(f"'{key}' must be text, not a file.", param=key, code="invalid_type")
                form[key] = value
    finally:
        await parsed.close()
    return form
