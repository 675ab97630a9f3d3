"""`reflashd`'s HTTP API (described in openapi.json beside this file) and the update page's files.

One operation at a time: a second one is 409 while the first runs. Blocking work runs in a thread;
what the operations leave is on disk (operations.py), so this module keeps only which one runs now.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from recovery.core.errors import Rejected, UpdateError
from recovery.updated import apitoken, trial
from recovery.updated.operations import Cancelled, Operations, Stop, reboot_time
from recovery.updated.servicestate import Phase, ServiceState
from recovery.updated.source import Source
from recovery.updated.transfer import Interrupted, Unreachable
from recovery.updated.updater import Busy, Reboot

log = logging.getLogger(__name__)


HERE = Path(__file__).resolve().parent
WEB = HERE / "web"
OPENAPI = HERE / "openapi.json"


TOKEN_HEADER = "X-Reflash-Token"


T = TypeVar("T")


class BadRequest(UpdateError):
    """The request itself makes no sense (not JSON, a field of the wrong type): 400."""

    kind = "bad request"


def http_status(e: UpdateError) -> int:
    """The status code of an operation's error; the body carries the CLI's one line."""
    if isinstance(e, BadRequest):
        return 400
    if isinstance(e, Busy):
        return 409
    if isinstance(e, Interrupted | Unreachable):
        return 502  # the bundle's or the feed's server, not this one
    if isinstance(e, Rejected):
        return 422
    return 500


def error(status: int, line: str, kind: str = "error") -> web.Response:
    return web.json_response({"error": line, "kind": kind}, status=status)


# How often a scheduled reboot looks at the wall clock again (Service._arm).
RECHECK = 30.0


class Service:
    """The daemon's only memory: which operation runs, the download's task, the reboot's timer."""

    def __init__(self, ops: Operations, *, reboot: Reboot, clock: Callable[[], datetime] | None = None,
                 recheck: float = RECHECK) -> None:
        self.ops = ops
        self.reboot_fn = reboot
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.recheck = recheck
        self.current: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop: Stop | None = None
        self.timer: asyncio.Handle | None = None
        self.closing = asyncio.Event()

    async def blocking(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    def claim(self, name: str) -> None:
        if self.current is not None:
            raise Busy(f"reflashd is busy: {self.current} is running")
        self.current = name

    # --- the download runs on after its request -------------------------------------------------

    def start_download(self, work: Callable[[Stop], object]) -> None:
        """Run `work` (a download, already claimed) in a thread until it ends; its outcome is on disk."""
        self.stop = Stop()
        stop = self.stop

        async def run() -> None:
            try:
                await self.blocking(lambda: work(stop))
            except UpdateError as e:
                log.info("download ended: %s: %s", e.kind, e)
            except Exception:
                log.exception("download failed")
            finally:
                self.current, self.task, self.stop = None, None, None

        self.task = asyncio.get_running_loop().create_task(run())

    async def stop_download(self, reason: UpdateError) -> None:
        if self.task is not None and self.stop is not None:
            self.stop.set(reason)
            await asyncio.shield(self.task)

    # --- the reboot ------------------------------------------------------------------------------

    def schedule_reboot(self, at: datetime | None) -> None:
        """Reboot at `at` (None: in a moment, once the answer is out); one timer at most."""
        self.cancel_reboot()
        if at is None:
            log.info("rebooting into the recovery in a moment")
            self.timer = asyncio.get_running_loop().call_later(0.5, self._fire)
            return
        log.info("rebooting into the recovery at %s (in %.0f s)", at.isoformat(timespec="seconds"),
                 max(0.0, (at - self.clock()).total_seconds()))
        self._arm(at)

    def _arm(self, at: datetime) -> None:
        """`at` is wall-clock time, and the loop's timers are monotonic: look at the wall clock again at
        least every `recheck` seconds, so that a clock set on the way (NTP after a boot with a wrong RTC,
        an operator's `date`) moves the reboot to the time the operator chose, not by the jump."""
        left = (at - self.clock()).total_seconds()
        loop = asyncio.get_running_loop()
        self.timer = (loop.call_later(min(left, self.recheck), self._arm, at) if left > 0
                      else loop.call_soon(self._fire))

    def _fire(self) -> None:
        asyncio.ensure_future(self._reboot())

    def cancel_reboot(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def _reboot(self) -> None:
        self.timer = None
        if not self.ops.config.instruction.exists():
            log.info("no update is staged any more: not rebooting")
            return
        try:
            await self.blocking(self.reboot_fn)
        except UpdateError as e:
            log.error("cannot reboot: %s", e)
            return
        state = self.ops.state()
        if state.reboot_at is not None:
            self.ops._save(ServiceState(state.download, None))  # done: a restart must not reboot again

    def restore(self) -> None:
        """At start: resume a download that broke off, re-arm a scheduled reboot of a staged update."""
        try:
            state = self.ops.state()
        except Rejected as e:
            log.warning("%s", e)  # status says so too; the daemon serves all the same
            return
        if state.reboot_at is not None:
            if self.ops.config.instruction.exists():
                self.schedule_reboot(datetime.fromisoformat(state.reboot_at))
            else:
                self.ops._save(ServiceState(state.download, None))
        if state.download is not None and state.download.phase == Phase.downloading:
            self.claim(f"the download of {state.download.file}")
            self.start_download(lambda stop: self.ops.resume(stop))

    def status(self) -> dict[str, Any]:
        status = self.ops.status()
        return {**status, "operation": self.current}


# --- requests ------------------------------------------------------------------------------------


async def body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object")
    return doc


def field(doc: dict[str, Any], name: str, kind: type[T], default: T | None = None) -> T | None:
    value = doc.get(name, default)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise BadRequest(f"{name} must be a {kind.__name__}")
    return value


def remote_only(request: web.Request, location: str | None) -> None:
    """On the TCP listener a source or feed given in the request must be http(s): the network's
    side has no business naming files on the appliance (the configured feed may be anything)."""
    if location is not None and request.app["token"] is not None and Source.parse(location).path is not None:
        raise Rejected(f"{location} is a local file: over the network only http and https sources are taken")


def service_of(request: web.Request) -> Service:
    return request.app["service"]


async def get_status(request: web.Request) -> web.Response:
    service = service_of(request)
    return web.json_response(await service.blocking(service.status))


async def get_download(request: web.Request) -> web.Response:
    service = service_of(request)
    status = await service.blocking(service.status)
    return web.json_response({"download": status["download"], "operation": status["operation"]})


async def post_check(request: web.Request) -> web.Response:
    service = service_of(request)
    doc = await body(request)
    remote_only(request, field(doc, "feed", str))
    feed = field(doc, "feed", str) or service.ops.config.daemon.feed
    if not feed:
        raise BadRequest("no feed given and none configured ([daemon] feed in system.toml)")
    return web.json_response(await service.blocking(lambda: service.ops.check(feed)))


async def post_download(request: web.Request) -> web.Response:
    service = service_of(request)
    doc = await body(request)
    source = field(doc, "source", str)
    latest = field(doc, "latest", bool, False)
    force = bool(field(doc, "force", bool, False))
    allow_downgrade = bool(field(doc, "allow_downgrade", bool, False))
    feed = field(doc, "feed", str) or service.ops.config.daemon.feed
    if bool(source) == bool(latest):
        raise BadRequest("give either source (a bundle's URL or path) or latest: true")
    if latest and not feed:
        raise BadRequest("latest needs a feed, and none is configured ([daemon] feed in system.toml)")
    remote_only(request, source or field(doc, "feed", str))
    service.claim("a download")
    try:
        if latest:
            assert feed is not None
            found = await service.blocking(
                lambda: service.ops.latest(feed, force=force, allow_downgrade=allow_downgrade))
            if found.source is None:
                service.current = None
                return web.json_response({"started": False, "message": found.message})
            target, release = found.source, found.release
        else:
            # Parsed here, so that a bad source is this request's answer and not a later surprise.
            target, release = Source.parse(source or ""), None
            target.name  # noqa: B018 - raises Rejected for a URL without a file name
        service.ops._refuse_while_staged("download")
    except BaseException:
        service.current = None
        raise
    service.current = f"the download of {target.name}"
    service.start_download(lambda stop: service.ops.download(
        target, release=release, force=force, allow_downgrade=allow_downgrade, stop=stop))
    return web.json_response({"started": True, "message": f"downloading {target}"}, status=202)


async def post_install(request: web.Request) -> web.Response:
    service = service_of(request)
    doc = await body(request)
    when = field(doc, "reboot", str)
    try:
        at = reboot_time(when, service.clock()) if when is not None else None
    except Rejected as e:
        raise BadRequest(str(e)) from None
    service.claim("an install")
    try:
        staged = await service.blocking(lambda: service.ops.install(reboot_at=at))
    finally:
        service.current = None
    if when is not None:
        service.schedule_reboot(at)
        reboot = "now" if at is None else at.isoformat(timespec="seconds")
        message = ("rebooting into the recovery to install it" if at is None
                   else f"the appliance reboots at {reboot} to install it")
    else:
        reboot = None
        message = "installed at the next reboot"
    return web.json_response({
        "staged": {"product": staged.product, "version": staged.version, "file": str(staged.file),
                   "sha256": staged.sha256},
        "reboot": reboot, "message": f"staged {staged.product} {staged.version}: {message}",
    })


async def post_cancel(request: web.Request) -> web.Response:
    service = service_of(request)
    doc = await body(request)
    discard = bool(field(doc, "discard", bool, False))
    done: list[str] = []
    if service.task is not None:
        await service.stop_download(Cancelled("the download was cancelled"))
        done.append("stopped the download")
    service.claim("a cancel")
    try:
        service.cancel_reboot()
        done += [line for line in await service.blocking(lambda: service.ops.cancel(discard=discard))
                 if not (done and line == "nothing to cancel")]
    finally:
        service.current = None
    return web.json_response({"done": done, "message": "; ".join(done)})


async def post_confirm(request: web.Request) -> web.Response:
    service = service_of(request)
    doc = await body(request)
    check = bool(field(doc, "check", bool, False))
    service.claim("a confirm")
    try:
        message = await service.blocking(
            lambda: trial.confirm(service.ops.config, check=check, reboot=service.reboot_fn))
    finally:
        service.current = None
    return web.json_response({"message": message})


async def get_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the status whenever it changes (checked twice a second), a comment every
    15 s so that proxies keep the stream open."""
    service = service_of(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    await response.prepare(request)
    last, quiet = None, 0.0
    try:
        while not service.closing.is_set():
            data = json.dumps(await service.blocking(service.status), sort_keys=True)
            if data != last:
                await response.write(f"event: status\ndata: {data}\n\n".encode())
                last, quiet = data, 0.0
            elif quiet >= 15:
                await response.write(b": still here\n\n")
                quiet = 0.0
            try:
                await asyncio.wait_for(service.closing.wait(), 0.5)
            except asyncio.TimeoutError:
                quiet += 0.5
    except (ConnectionError, asyncio.CancelledError):
        pass
    return response


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/json")


async def get_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB / "index.html")


STATIC = {"update.css": "text/css", "update.js": "text/javascript"}


async def get_static(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.FileResponse(WEB / name, headers={"Content-Type": STATIC[name]})


# --- the guard at the door -----------------------------------------------------------------------


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _same_origin(request: web.Request) -> bool:
    """A browser names the page a request comes from; one from another site is refused outright
    (a tool such as curl or reflashctl names none)."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return urllib.parse.urlsplit(origin).netloc == request.host
    return request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every API call on the TCP listener carries the token; a POST is JSON, from this origin."""
    try:
        if request.path.startswith("/api/"):
            token = request.app["token"]
            if token is not None:
                given = request.headers.get(TOKEN_HEADER)
                if given is None and request.path == "/api/events" and request.method == "GET":
                    given = request.query.get("token")  # EventSource cannot send headers
                if not apitoken.matches(given, token):
                    return error(401, "refused: wrong or missing access token (reflashctl token shows it)")
            if not _same_origin(request):
                return error(403, "refused: a request from another site")
            if request.method == "POST" and request.content_type != "application/json":
                return error(415, "refused: a POST must be Content-Type: application/json")
        response = await handler(request)
    except UpdateError as e:
        response = error(http_status(e), f"{e.kind}: {e}", e.kind)
    except web.HTTPException as e:
        if not request.path.startswith("/api/"):
            raise
        response = error(e.status, f"{e.reason}: {request.method} {request.path}")
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
    return response


ROUTES = [
    ("GET", "/", get_page),
    ("GET", "/static/{name}", get_static),
    ("GET", "/api/openapi.json", get_openapi),
    ("GET", "/api/status", get_status),
    ("GET", "/api/download", get_download),
    ("GET", "/api/events", get_events),
    ("POST", "/api/check", post_check),
    ("POST", "/api/download", post_download),
    ("POST", "/api/install", post_install),
    ("POST", "/api/cancel", post_cancel),
    ("POST", "/api/confirm", post_confirm),
]


def make_app(service: Service, *, token: str | None) -> web.Application:
    """The API and the page; `token`: required on every API call (the TCP listener), None on the
    root-only Unix socket."""
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app["service"] = service
    app["token"] = token
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app

