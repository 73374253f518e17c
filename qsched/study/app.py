"""The study's web app (Starlette, ASGI): it only moves data between the page and the service.

Routes (all under the server's root):

* ``GET /`` the annotator's page; ``GET /static/study.js``, ``/static/study.css`` its parts
* ``GET /api/next?annotator=ID`` the next question (prompt, two image URLs) and progress
* ``POST /api/vote`` ``{"annotator", "question", "answer": "left"|"right"|"tie", "response_ms"}``
* ``GET /img/TOKEN`` an image of the study (tokens come only from ``/api/next``)
* ``GET /results`` (HTML, reloads) and ``/api/results`` (JSON): the organiser's live view
* ``GET /healthz`` liveness

With an annotator token, ``/api/*`` needs it (header ``X-Study-Token`` or ``?t=``);
the organiser's pages always need theirs (``Authorization: Bearer`` or ``?token=``).
Bodies over 4 KiB are refused with 413 before they are read whole.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from importlib import resources
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from qsched.study.results import html_page, summarize
from qsched.study.service import InvalidVote, StudyService

MAX_BODY = 4096
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # links may carry an annotator token
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
                               "frame-ancestors 'none'",
    "Cache-Control": "no-store",
}
#: The organiser's live page recomputes at most this often (bootstrap rounds are not free).
RESULTS_TTL_S = 5.0
LIVE_BOOTSTRAP_ROUNDS = 200


def _static(name: str) -> bytes:
    return resources.files("qsched.study").joinpath("static", name).read_bytes()


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def _token_ok(given: str | None, expected: str | None) -> bool:
    return expected is None or (given is not None and hmac.compare_digest(given.encode(), expected.encode()))


def create_app(service: StudyService, *, annotator_token: str | None = None, organiser_token: str) -> Starlette:
    """The ASGI app of one study (``organiser_token`` guards the results pages)."""
    page, script, style = _static("index.html"), _static("study.js"), _static("study.css")
    cache: dict[str, Any] = {"at": -1e9, "summary": None}
    cache_lock = threading.Lock()

    def annotator_allowed(request: Request) -> bool:
        return _token_ok(request.headers.get("x-study-token") or request.query_params.get("t"), annotator_token)

    def organiser_allowed(request: Request) -> bool:
        bearer = request.headers.get("authorization", "")
        given = bearer[7:] if bearer.lower().startswith("bearer ") else request.query_params.get("token")
        return _token_ok(given, organiser_token) if given else False

    async def index(_: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    def static(body: bytes, media_type: str) -> Callable[[Request], Any]:
        async def endpoint(_: Request) -> Response:
            return Response(body, media_type=media_type, headers=SECURITY_HEADERS)
        return endpoint

    async def next_question(request: Request) -> Response:
        if not annotator_allowed(request):
            return _error("a valid study token is needed (the link you were given has it)", 401)
        try:
            data = await run_in_threadpool(service.next_question, request.query_params.get("annotator", ""))
        except InvalidVote as err:
            return _error(str(err), err.status)
        return JSONResponse(data, headers=SECURITY_HEADERS)

    async def vote(request: Request) -> Response:
        if not annotator_allowed(request):
            return _error("a valid study token is needed (the link you were given has it)", 401)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error("send the vote as application/json", 415)
        try:
            payload = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return _error("the body is not JSON", 400)
        try:
            data = await run_in_threadpool(service.submit, payload)
        except InvalidVote as err:
            return _error(str(err), err.status)
        return JSONResponse(data, headers=SECURITY_HEADERS)

    async def image(request: Request) -> Response:
        path = service.image_path(request.path_params["token"])
        if path is None:
            return _error("no such image", 404)
        return FileResponse(path, media_type="image/png", content_disposition_type="inline",
                            headers={**SECURITY_HEADERS, "Cache-Control": "private, max-age=86400, immutable"})

    def current_summary() -> dict[str, Any]:
        with cache_lock:
            if time.monotonic() - cache["at"] > RESULTS_TTL_S:
                cache["summary"] = summarize(service.store.all_votes(), configs=service.source.configs,
                                             pairs=service.design.pairs, rounds=LIVE_BOOTSTRAP_ROUNDS)
                cache["at"] = time.monotonic()
            return cache["summary"]

    async def results_json(request: Request) -> Response:
        if not organiser_allowed(request):
            return _error("the organiser token is needed", 401)
        return JSONResponse(await run_in_threadpool(current_summary), headers=SECURITY_HEADERS)

    async def results_html(request: Request) -> Response:
        if not organiser_allowed(request):
            return _error("the organiser token is needed", 401)
        summary = await run_in_threadpool(current_summary)
        headers = {**SECURITY_HEADERS, "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"}
        return HTMLResponse(html_page(summary), headers=headers)

    async def health(_: Request) -> Response:
        return JSONResponse({"ok": True}, headers=SECURITY_HEADERS)

    routes = [
        Route("/", index),
        Route("/static/study.js", static(script, "text/javascript; charset=utf-8")),
        Route("/static/study.css", static(style, "text/css; charset=utf-8")),
        Route("/api/next", next_question),
        Route("/api/vote", vote, methods=["POST"]),
        Route("/img/{token:str}", image),
        Route("/results", results_html),
        Route("/api/results", results_json),
        Route("/healthz", health),
    ]
    return Starlette(routes=routes, max_body_size=MAX_BODY)
