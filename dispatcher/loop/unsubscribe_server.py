"""``dispatcher unsubscribe-server``: RFC 8058 one-click unsubscribes into the suppression list.

    POST <any path>/TOKEN   body List-Unsubscribe=One-Click  -> suppressed as unsubscribe, 200
    GET  <any path>/TOKEN   a page naming the address, with a button that POSTs; changes nothing
    GET  /metrics           Prometheus

The token (``dispatcher.loop.tokens``) is the last path segment of the URL that
``unsubscribe.url`` renders with ``{{ token }}``; it names the job and the recipient and
is signed with ``unsubscribe.secret``. A token that does not verify is 403 and changes
nothing. A GET never unsubscribes: mail filters and link scanners fetch every URL in a
message (RFC 8058 section 3). Meant to run behind a TLS reverse proxy (the URL must be
https for mailbox providers to offer one-click).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import signal
import socket
from collections.abc import Iterator
from email import message_from_bytes
from urllib.parse import parse_qs

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from dispatcher.loop.suppression import Reason, Record, Store, SuppressionMetrics
from dispatcher.loop.tokens import BadToken, read_token

log = structlog.get_logger("dispatcher.unsubscribe")

MAX_BODY = 64 * 1024  # a one-click body is 26 bytes; a form with a file is not one

# The page is served with a strict policy: no script, no framing (the button must not be
# clickable through someone else's page), and the token never leaks in a Referer.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex, nofollow",
}

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{title}</title>
<style>
  body {{ font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; background: #f4f5f7;
         color: #1d1f23; line-height: 1.5; }}
  main {{ max-width: 28rem; margin: 12vh auto 0; padding: 2rem 1.5rem; background: #fff; border-radius: 12px;
          box-shadow: 0 1px 4px rgba(0,0,0,.08); }}
  h1 {{ font-size: 1.4rem; margin: 0 0 1rem; }}
  p {{ margin: 0 0 1.25rem; font-size: 1.05rem; }}
  .address {{ font-weight: 600; word-break: break-all; }}
  button {{ display: block; width: 100%; padding: .9rem 1rem; font-size: 1.1rem; font-weight: 600; color: #fff;
            background: #c62828; border: 0; border-radius: 8px; cursor: pointer; }}
  button:focus-visible {{ outline: 3px solid #1a73e8; outline-offset: 2px; }}
  @media (max-width: 30rem) {{ main {{ margin: 0; border-radius: 0; min-height: 100vh; box-shadow: none; }} }}
</style>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=html.escape(title), body=body), status_code=status, headers=_HEADERS)


class UnsubscribeApp:
    """The ASGI application: ``UnsubscribeApp(store, secret).app`` (a Starlette app)."""

    def __init__(self, store: Store, secret: str, *, registry: CollectorRegistry | None = None) -> None:
        self.store = store
        self._secret = secret
        self.registry = registry if registry is not None else CollectorRegistry()
        self.suppressions = SuppressionMetrics(self.registry)
        self.requests = Counter("dispatcher_unsubscribe_requests", "Unsubscribe requests by method and outcome.",
                                ["method", "outcome"], registry=self.registry)
        self.app = Starlette(routes=[
            Route("/metrics", self._metrics, methods=["GET"]),
            Route("/{path:path}", self._unsubscribe, methods=["GET", "POST"]),
        ])

    async def _metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def _unsubscribe(self, request: Request) -> Response:
        method = request.method
        token = request.path_params["path"].rstrip("/").rpartition("/")[2] or request.query_params.get("token", "")
        try:
            job_id, recipient = read_token(self._secret, token)
        except BadToken as exc:
            self.requests.labels(method, "forbidden").inc()
            log.info("unsubscribe.forbidden", method=method, reason=str(exc))
            return _page("Link not valid", "<h1>This unsubscribe link is not valid</h1>"
                         "<p>It may have been changed or cut short. Use the link from the message as it is.</p>",
                         status=403)
        if method == "GET":
            self.requests.labels(method, "page").inc()
            return _page("Unsubscribe", f"""<h1>Unsubscribe</h1>
<p>Stop sending email to <span class="address">{html.escape(recipient)}</span>?</p>
<form method="post">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button>
</form>""")
        if not await _one_click(request):
            self.requests.labels(method, "bad_request").inc()
            return PlainTextResponse("the body must be List-Unsubscribe=One-Click (RFC 8058)\n", status_code=400,
                                     headers=_HEADERS)
        record = Record(recipient, Reason.UNSUBSCRIBE, "unsubscribe-server", job_id, "one-click unsubscribe")
        added = await asyncio.to_thread(self.store.add, [record])
        if added:
            self.suppressions.added.labels(Reason.UNSUBSCRIBE.value).inc()
        self.requests.labels(method, "unsubscribed").inc()
        log.info("unsubscribe.done", job_id=job_id, new=bool(added))
        if "text/html" in request.headers.get("accept", ""):  # a person who pressed the button
            return _page("Unsubscribed", f"""<h1>You are unsubscribed</h1>
<p><span class="address">{html.escape(recipient)}</span> will get no more email from us.</p>""")
        return PlainTextResponse("unsubscribed\n", headers=_HEADERS)


async def _one_click(request: Request) -> bool:
    """The body holds ``List-Unsubscribe=One-Click`` (RFC 8058 section 3.1), as
    application/x-www-form-urlencoded or multipart/form-data."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return False
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode("latin-1", "replace")
        for part in message_from_bytes(head + body).walk():
            if part.get_param("name", header="content-disposition") == "List-Unsubscribe":
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes) and payload.strip() == b"One-Click":
                    return True
        return False
    values = parse_qs(body.decode("utf-8", "replace")).get("List-Unsubscribe", [])
    return "One-Click" in values


def listen(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: any free one). Raises OSError."""
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)


async def serve(app: UnsubscribeApp, sock: socket.socket) -> None:
    """Serve on ``sock`` until SIGINT or SIGTERM, then finish the requests in progress
    (at most 5 s) and return."""
    import uvicorn

    class Server(uvicorn.Server):
        # uvicorn re-raises the signal after its shutdown (the process then dies of it);
        # a server asked to stop has done what it was asked: it returns instead.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(app.app, log_level="warning", access_log=False, server_header=False,
                            proxy_headers=True, timeout_graceful_shutdown=5, lifespan="off")
    server = Server(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, setattr, server, "should_exit", True)
    await server.serve(sockets=[sock])
