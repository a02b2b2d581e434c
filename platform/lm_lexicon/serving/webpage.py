"""The page a lexicographer opens: ``GET /`` on the Serve ingress (``static/``: one HTML file, one small JS file,
one CSS file; no CDN, no build step, no request leaves the server).

The page is a client of the JSON API: ``GET /v1/model`` (limits, languages, whether a token is needed: a 401 makes
the page ask for it and keep it in the tab's ``sessionStorage``) and ``POST /v1/definitions`` (one term with n
alternatives and their reward-model scores, or a batch of pasted lines / an uploaded CSV or JSONL, with a CSV to
download). The page itself needs no token: it holds no data.
"""
from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).with_name("static")
MEDIA_TYPES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
               "style.css": "text/css; charset=utf-8"}
# Only this server's own files may load; blob: is the CSV download the page builds.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def load_assets() -> dict[str, bytes]:
    """The page's files, read once (the ingress serves them from memory)."""
    return {name: (STATIC_DIR / name).read_bytes() for name in MEDIA_TYPES}


def asset(assets: dict[str, bytes], name: str):
    """The response for one of the page's files, or None for an unknown name."""
    from fastapi.responses import Response

    if name not in assets:
        return None
    return Response(assets[name], media_type=MEDIA_TYPES[name], headers=HEADERS)
