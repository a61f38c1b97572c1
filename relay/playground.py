"""The playground page: static HTML, CSS and JavaScript shipped in the relay package (``playground/``),
served without a key (every API call the page makes carries the key the person types). Nothing is
fetched from elsewhere, no script runs inline, and the Content-Security-Policy says so."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

FILES = Path(__file__).parent / "playground"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
HEADERS = {
    # Only the relay's own scripts, styles and connections (fetch and the live websocket); audio
    # from blob: URLs the page makes of what it received.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; media-src 'self' blob:; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def page(request: Request) -> Response:
    return _file("index.html")


async def asset(request: Request) -> Response:
    """``/playground/<name>``: one of the page's own files, nothing else."""
    name = request.path_params["name"]
    if name not in ("playground.js", "playground.css"):
        return Response(status_code=404)
    return _file(name)


def _file(name: str) -> Response:
    path = FILES / name
    return Response(path.read_bytes(), media_type=_TYPES[path.suffix], headers=HEADERS)
