"""What the two web apps (``rank serve``, ``studio``) check on every request before routing it."""

from __future__ import annotations

from fastapi import Request

from .errors import UserError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
TOKEN_COOKIE = "ernie_lora_token"


def host_name(host_header: str) -> str:
    """``localhost:8765`` -> ``localhost``; ``[::1]:8765`` -> ``::1``."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def check_bind(host: str, token: str | None, what: str) -> None:
    if host not in LOOPBACK and not token:
        raise UserError(f"--host {host}: anyone on the network could {what}; add --token SECRET (or bind 127.0.0.1)")


def refusal(request: Request, max_body: int, token: str | None) -> tuple[int, str] | None:
    """(status, reason) when the request is refused before routing: a body without a Content-Length or over
    ``max_body``, or, with no token, a Host that is not a loopback name (DNS rebinding)."""
    length = request.headers.get("content-length")
    if request.method not in ("GET", "HEAD") and (length is None or not length.isdigit()):
        return 411, "a request body needs a Content-Length"
    if length is not None and length.isdigit() and int(length) > max_body:
        return 413, f"request body over {max_body} bytes"
    if not token and host_name(request.headers.get("host", "")) not in LOOPBACK:
        return 403, "Host is not a loopback name"
    return None


def given_token(request: Request) -> str:
    """The token a request carries: ``?token=``, the ``X-Token`` header or the cookie set on first visit."""
    return (request.query_params.get("token") or request.headers.get("x-token")
            or request.cookies.get(TOKEN_COOKIE) or "")
