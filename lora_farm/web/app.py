"""The dashboard's routes: pages, the fragments their script refreshes, files, actions.

Pages render whole; each live part of a page (``data-live``) is also a route of its own that
``static/live.js`` fetches every two seconds and swaps in. Reads need no token unless the
dashboard listens beyond this machine; actions (POST) always need it (``actions.check_token``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlencode

import redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from lora_farm.cli.status_view import format_mb, format_stamp, step_progress, summary_line
from lora_farm.errors import JobNotFound, LoraFarmError
from lora_farm.ledger import Ledger
from lora_farm.protocol import format_duration
from lora_farm.redis_conn import redact_url
from lora_farm.settings import Settings
from lora_farm.web import actions, charts, jobdir, reading
from lora_farm.web.guard import TOKEN_COOKIE, ReadGuard
from lora_farm.workers import lifecycle

HERE = Path(__file__).parent
LIVE_MS = 2000


@dataclass(frozen=True)
class WebConfig:
    token: str = ""  # LORAFARM_WEB_TOKEN: actions need it
    guard_reads: bool = False  # listening beyond loopback: reads need it too (from other hosts)


def create_app(ledger: Ledger, settings: Settings, config: WebConfig) -> Starlette:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(mb=format_mb, duration=format_duration, stamp=format_stamp, ago=_ago,
                                 progress=step_progress)
    templates.env.globals.update(live_ms=LIVE_MS, actions_on=bool(config.token))
    pages = Pages(ledger, settings, config, templates)
    routes = [
        Route("/", lambda request: RedirectResponse("/jobs", 303)),
        Route("/healthz", pages.health),
        Route("/login", pages.login, methods=["GET", "POST"]),
        Route("/jobs", pages.view("jobs.html", pages.jobs_context)),
        Route("/jobs/table", pages.view("_jobs_table.html", pages.jobs_context)),
        Route("/batches", pages.view("batches.html", lambda _: {"rows": reading.batches(ledger)})),
        Route("/jobs/{job_id}", pages.job),
        Route("/jobs/{job_id}/live", pages.view("_job_live.html", pages.job_context)),
        Route("/jobs/{job_id}/files/{path:path}", pages.job_file),
        Route("/jobs/{job_id}/cancel", partial(pages.act, action=actions.cancel), methods=["POST"]),
        Route("/jobs/{job_id}/retry", partial(pages.act, action=lifecycle.retry), methods=["POST"]),
        Route("/cards", pages.view("cards.html", pages.cards_context)),
        Route("/cards/table", pages.view("_cards_table.html", pages.cards_context)),
        Route("/submit", pages.view("submit.html", lambda _: {"result": None, "text": "", "batch": ""})),
        Route("/submit", pages.submit, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [Middleware(ReadGuard, token=config.token)] if config.guard_reads else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={
        JobNotFound: pages.not_found, redis.RedisError: pages.ledger_down})


class Pages:
    def __init__(self, ledger: Ledger, settings: Settings, config: WebConfig,
                 templates: Jinja2Templates):
        self.ledger, self.settings, self.config, self.templates = ledger, settings, config, templates

    def render(self, request: Request, name: str, status: int = 200, **context) -> Response:
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    def view(self, name: str, context: Callable[[Request], dict]) -> Callable:
        """The endpoint of a page, or of its live part: template ``name`` with ``context(request)``."""
        async def endpoint(request: Request) -> Response:
            return self.render(request, name, **context(request))
        return endpoint

    async def health(self, request: Request) -> Response:
        self.ledger.client.ping()
        return PlainTextResponse("ok")

    async def not_found(self, request: Request, error: Exception) -> Response:
        return self.render(request, "message.html", 404, title="not found", message=str(error))

    async def ledger_down(self, request: Request, error: Exception) -> Response:
        message = (f"the ledger does not answer (Redis {redact_url(self.settings.redis_url)}: "
                   f"{type(error).__name__}). This page works again once Redis is back.")
        return self.render(request, "message.html", 503, title="ledger unavailable", message=message)

    # ---- jobs ---------------------------------------------------------------------------

    def jobs_context(self, request: Request) -> dict:
        query = request.query_params
        batch, state = query.get("batch") or None, query.get("state") or None
        page = reading.jobs_page(self.ledger, _int(query.get("page"), 1), batch=batch, state=state)
        links = {n: "/jobs?" + urlencode({k: v for k, v in (("batch", batch), ("state", state),
                                                             ("page", n)) if v})
                 for n in (page.page - 1, page.page + 1)}
        return {"page": page, "batch": batch, "state": state, "links": links, "now": time.time(),
                "summary": summary_line(page.counts),
                "table_url": "/jobs/table?" + str(request.query_params)}

    # ---- one job ------------------------------------------------------------------------

    def job_context(self, request: Request) -> dict:
        view = reading.job_view(self.ledger, request.path_params["job_id"], self.settings)
        curves = view.curves
        return {"view": view, "r": view.record, "now": time.time(), "is_image": jobdir.is_image,
                "loss_chart": charts.line_chart({"loss": curves.loss, "eval loss": curves.eval_loss},
                                                "loss"),
                "lr_chart": charts.line_chart({"learning rate": curves.lr}, "learning rate")}

    async def job(self, request: Request, message: str = "", status: int = 200) -> Response:
        return self.render(request, "job.html", status, message=message, message_error=status >= 400,
                           **self.job_context(request))

    async def job_file(self, request: Request) -> Response:
        record = self.ledger.find(request.path_params["job_id"])
        found = jobdir.file_in_job(reading.job_folder(record, self.settings), request.path_params["path"])
        if found is None:
            return PlainTextResponse(f"job {record.id} has no file {request.path_params['path']!r}", 404)
        download = request.query_params.get("download")
        return FileResponse(found, filename=found.name if download else None)

    async def act(self, request: Request, action: Callable[[Ledger, str], str]) -> Response:
        """A job's action (cancel, retry) behind the token; the job page says what happened."""
        job_id = request.path_params["job_id"]
        form = await request.form()
        try:
            actions.check_token(self.config.token, _given_token(request, form))
            message, status = action(self.ledger, job_id), 200
        except actions.ActionRefused as error:
            message, status = str(error), 403
        except JobNotFound:
            raise
        except LoraFarmError as error:
            message, status = str(error), 409
        return await self.job(request, message=message, status=status)

    # ---- cards --------------------------------------------------------------------------

    def cards_context(self, request: Request) -> dict:
        return {"cards": reading.cards(self.ledger, self.settings),
                "workers": reading.worker_rows(self.ledger)}

    # ---- submit -------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        form = await request.form()
        text, name = str(form.get("yaml") or ""), "pasted.yaml"
        upload = form.get("file")
        if upload is not None and not isinstance(upload, str) and upload.filename:
            text, name = (await upload.read()).decode("utf-8", errors="replace"), upload.filename
        batch = str(form.get("batch") or "")
        try:
            actions.check_token(self.config.token, _given_token(request, form))
        except actions.ActionRefused as error:
            result = actions.SubmitResult(error=str(error))
            return self.render(request, "submit.html", 403, result=result, text=text, batch=batch)
        if not text.strip():
            result = actions.SubmitResult(error="nothing to submit: paste a job spec or choose a file.")
        else:
            result = actions.submit_text(self.ledger, self.settings, text, name, batch)
        status = 200 if result.lines else 422
        return self.render(request, "submit.html", status, result=result, text=text, batch=batch)

    # ---- login (reads from other hosts) ---------------------------------------------------

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return self.render(request, "login.html", message="")
        form = await request.form()
        try:
            actions.check_token(self.config.token, str(form.get("token") or ""))
        except actions.ActionRefused as error:
            return self.render(request, "login.html", 403, message=str(error))
        response = RedirectResponse("/jobs", 303)
        response.set_cookie(TOKEN_COOKIE, str(form.get("token")), httponly=True, samesite="strict")
        return response


def _given_token(request: Request, form) -> str:
    """The header or the form field, never the login cookie: a form another site posts would
    carry the cookie, never the token."""
    return request.headers.get(actions.TOKEN_HEADER) or str(form.get("token") or "")


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


def _ago(seconds: float | None) -> str:
    return "" if seconds is None else f"{format_duration(seconds)} ago"
