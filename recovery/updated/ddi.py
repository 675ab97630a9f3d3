"""hawkBit's Direct Device Integration (DDI) API, the device's side: poll the controller base, send
configData, read a deployment, send feedback, read a cancellation. The protocol only; what to do with
a deployment is fleet.py's.

Everything the server sends is untrusted: documents are checked field by field, links are followed only
to the configured server (the token goes with them), and its strings reach a log only through
`one_line`. Nothing it sends is installed before our own signature check (Operations.download).
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from recovery.core.errors import Failed
from recovery.core.output import strip_controls
from recovery.updated.source import Scheme, Source

log = logging.getLogger(__name__)


DOCUMENT_CAP = 1024 * 1024  # no DDI document is near this; more is garbage
USER_AGENT = "reflash-fleet/1"
MIN_SLEEP, MAX_SLEEP = 1.0, 24 * 3600.0  # what a server's polling.sleep is held to
ACTION_ID = re.compile(r"-?[0-9A-Za-z_.]{1,64}")  # an id goes into URLs, logs and fleet.json


def one_line(text: object, cap: int = 300) -> str:
    """A server's string safe for a log line and a terminal: no control characters, one line, capped."""
    return " ".join(strip_controls(str(text)).split())[:cap]


class ServerError(Failed):
    """The fleet server could not be used this time; the reason is one line. Never about the bundle."""


class Unreachable(ServerError):
    """Down, slow, or answering 5xx/408/429: try again later."""


class Refused(ServerError):
    """HTTP 401/403: the server does not accept this device's token."""


class Garbage(ServerError):
    """An answer that is not the DDI document it should be."""


class NotFound(ServerError):
    """HTTP 404 for a resource the server itself linked to."""


class Handling(StrEnum):
    """`download` and `update` of a deployment."""

    skip = "skip"
    attempt = "attempt"
    forced = "forced"


class Execution(StrEnum):
    proceeding = "proceeding"
    downloaded = "downloaded"
    scheduled = "scheduled"
    closed = "closed"
    rejected = "rejected"
    canceled = "canceled"
    resumed = "resumed"


class Finished(StrEnum):
    success = "success"
    failure = "failure"
    none = "none"


@dataclass(frozen=True)
class Poll:
    """The controller base resource: how long to sleep and what the server wants done."""

    sleep: float
    deployment: str | None = None  # href of deploymentBase
    cancel: str | None = None  # href of cancelAction
    config_data: str | None = None  # href of configData: the server asks for the attributes

    def offers(self, action: str) -> bool:
        """Whether the deployment link is to `action` (its last path segment is the action id)."""
        return self.deployment is not None and action_of(self.deployment) == action


@dataclass(frozen=True)
class Artifact:
    filename: str
    size: int | None
    sha256: str | None
    sha1: str | None
    md5: str | None
    href: str


@dataclass(frozen=True)
class Chunk:
    part: str
    version: str
    name: str
    artifacts: tuple[Artifact, ...]


@dataclass(frozen=True)
class Deployment:
    id: str
    download: Handling
    update: Handling
    maintenance: bool | None  # None: no window; True: inside it; False: outside it
    chunks: tuple[Chunk, ...]


def action_of(href: str) -> str:
    return urllib.parse.urlsplit(href).path.rstrip("/").rpartition("/")[2]


def parse_sleep(text: object) -> float:
    """hawkBit's `HH:MM:SS` -> seconds, held to [MIN_SLEEP, MAX_SLEEP]."""
    if not isinstance(text, str) or not re.fullmatch(r"[0-9]{1,3}:[0-5][0-9]:[0-5][0-9]", text):
        raise Garbage(f"polling sleep {one_line(text, 40)!r} is not HH:MM:SS")
    hours, minutes, seconds = (int(x) for x in text.split(":"))
    return min(max(float(hours * 3600 + minutes * 60 + seconds), MIN_SLEEP), MAX_SLEEP)


@dataclass(frozen=True)
class Controller:
    """One device's view of one DDI server: `{server}/{tenant}/controller/v1/{controller_id}`."""

    server: str  # scheme://host[:port][/prefix], no trailing slash
    tenant: str
    controller_id: str
    token: str
    gateway: bool = False  # the tenant's gateway token instead of the device's own target token
    timeout: float = 30.0

    @property
    def base(self) -> str:
        quote = lambda s: urllib.parse.quote(s, safe="")  # noqa: E731
        return f"{self.server}/{quote(self.tenant)}/controller/v1/{quote(self.controller_id)}"

    def __repr__(self) -> str:  # the token stays out of every log line
        return f"Controller({self.base!r})"

    # --- resources -------------------------------------------------------------------------------

    def poll(self) -> Poll:
        doc = self._object(self._request("GET", self.base), "controller base")
        config = doc.get("config")
        polling = config.get("polling") if isinstance(config, dict) else None
        sleep = parse_sleep(polling.get("sleep") if isinstance(polling, dict) else None)
        links = doc.get("_links", {})
        if not isinstance(links, dict):
            raise Garbage("controller base: _links is not an object")
        return Poll(sleep, deployment=self._link(links, "deploymentBase"), cancel=self._link(links, "cancelAction"),
                    config_data=self._link(links, "configData"))

    def put_config(self, attributes: dict[str, str]) -> None:
        self._request("PUT", f"{self.base}/configData", {"mode": "merge", "data": attributes})

    def deployment(self, href: str) -> Deployment:
        doc = self._object(self._request("GET", self._own(href)), "deployment")
        action = doc.get("id")
        body = doc.get("deployment")
        if not isinstance(action, str | int) or isinstance(action, bool) or not isinstance(body, dict):
            raise Garbage("deployment: no id or no deployment object")
        action = str(action)
        if not ACTION_ID.fullmatch(action):
            raise Garbage("deployment: the action id is not a plain name")
        window = body.get("maintenanceWindow")
        if window not in (None, "available", "unavailable"):
            raise Garbage(f"deployment: maintenanceWindow {one_line(window, 40)!r}")
        chunks = body.get("chunks")
        if not isinstance(chunks, list):
            raise Garbage("deployment: chunks is not a list")
        return Deployment(action, self._handling(body, "download"), self._handling(body, "update"),
                          None if window is None else window == "available",
                          tuple(self._chunk(c) for c in chunks[:16]))

    def feedback(self, action: str, execution: Execution, finished: Finished = Finished.none, *,
                 progress: tuple[int, int] | None = None, details: list[str] | tuple[str, ...] = ()) -> None:
        """POST a deployment's feedback; `details` are our own lines (a reason is already one line)."""
        self._request("POST", f"{self.base}/deploymentBase/{urllib.parse.quote(action, safe='')}/feedback",
                      self._status(action, execution, finished, progress, details))

    def cancel_action(self, href: str) -> str:
        """The id of the action the server wants cancelled (`cancelAction.stopId`)."""
        if not ACTION_ID.fullmatch(action_of(href)):
            raise Garbage("cancel action: its link does not end in a plain id")
        doc = self._object(self._request("GET", self._own(href)), "cancel action")
        body = doc.get("cancelAction")
        stop = body.get("stopId") if isinstance(body, dict) else None
        if not isinstance(stop, str | int) or isinstance(stop, bool) or not ACTION_ID.fullmatch(str(stop)):
            raise Garbage("cancel action: no stopId, or not a plain name")
        return str(stop)

    def cancel_feedback(self, cancel: str, execution: Execution, finished: Finished, details: list[str]) -> None:
        self._request("POST", f"{self.base}/cancelAction/{urllib.parse.quote(cancel, safe='')}/feedback",
                      self._status(cancel, execution, finished, None, details))

    def artifact_source(self, artifact: Artifact) -> Source:
        """Where to download `artifact`: the token only goes to the configured server itself."""
        source = Source.parse(_plain(artifact.href))
        if not source.scheme.remote:
            raise Garbage("artifact: the download link is not http or https")
        if urllib.parse.urlsplit(self.server).scheme == Scheme.https and source.scheme != Scheme.https:
            raise Garbage("artifact: a plain-http download link from an https server")
        headers = (("Authorization", self._authorization()),) if self._same_origin(artifact.href) else ()
        return Source(source.scheme, source.url, headers=headers, filename=artifact.filename)

    # --- plumbing --------------------------------------------------------------------------------

    def _authorization(self) -> str:
        return f"{'GatewayToken' if self.gateway else 'TargetToken'} {self.token}"

    def _same_origin(self, href: str) -> bool:
        a, b = urllib.parse.urlsplit(href), urllib.parse.urlsplit(self.server)
        return (a.scheme.lower(), a.hostname, a.port) == (b.scheme.lower(), b.hostname, b.port)

    def _own(self, href: str) -> str:
        """A link the server gave, if it is to the server itself (else the token would go elsewhere)."""
        _plain(href)
        if not self._same_origin(href) or not urllib.parse.urlsplit(href).path.startswith(
                urllib.parse.urlsplit(self.base).path + "/"):
            raise Garbage(f"a link outside this controller's resources refused: {one_line(href, 120)}")
        return href

    def _link(self, links: dict[str, Any], name: str) -> str | None:
        link = links.get(name)
        if link is None:
            return None
        href = link.get("href") if isinstance(link, dict) else None
        if not isinstance(href, str):
            raise Garbage(f"controller base: link {name} has no href")
        return self._own(href)

    @staticmethod
    def _handling(body: dict[str, Any], key: str) -> Handling:
        value = body.get(key, "forced")
        try:
            return Handling(value)
        except ValueError:
            raise Garbage(f"deployment: {key} is {one_line(value, 40)!r}, not skip, attempt or forced") from None

    @staticmethod
    def _chunk(doc: object) -> Chunk:
        if not isinstance(doc, dict) or not isinstance(doc.get("artifacts"), list):
            raise Garbage("deployment: a chunk without artifacts")
        artifacts = []
        for item in doc["artifacts"][:16]:
            if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
                raise Garbage("deployment: an artifact without a filename")
            hashes = item.get("hashes") if isinstance(item.get("hashes"), dict) else {}
            links = item.get("_links") if isinstance(item.get("_links"), dict) else {}
            link = links.get("download") or links.get("download-http")
            href = link.get("href") if isinstance(link, dict) else None
            if not isinstance(href, str):
                raise Garbage("deployment: an artifact without a download link")
            size = item.get("size")

            def digest(name: str, length: int) -> str | None:
                value = hashes.get(name)
                if value is None:
                    return None
                if not isinstance(value, str) or not re.fullmatch(f"[0-9a-fA-F]{{{length}}}", value):
                    raise Garbage(f"deployment: artifact {name} is not {length} hex digits")
                return value.lower()

            artifacts.append(Artifact(
                filename=item["filename"], size=size if type(size) is int and size >= 0 else None,
                sha256=digest("sha256", 64), sha1=digest("sha1", 40), md5=digest("md5", 32), href=href,
            ))
        text = lambda key: doc.get(key) if isinstance(doc.get(key), str) else ""  # noqa: E731
        return Chunk(text("part"), text("version"), text("name"), tuple(artifacts))

    @staticmethod
    def _status(action: str, execution: Execution, finished: Finished, progress: tuple[int, int] | None,
                details: list[str] | tuple[str, ...]) -> dict[str, Any]:
        result: dict[str, Any] = {"finished": str(finished)}
        if progress is not None:
            result["progress"] = {"cnt": progress[0], "of": progress[1]}
        return {
            "id": action,
            "time": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S"),
            "status": {"execution": str(execution), "result": result, "details": list(details)},
        }

    @staticmethod
    def _object(raw: bytes, what: str) -> dict[str, Any]:
        try:
            doc = json.loads(raw)
        except ValueError:
            raise Garbage(f"{what}: the answer is not JSON") from None
        if not isinstance(doc, dict):
            raise Garbage(f"{what}: the answer is not a JSON object")
        return doc

    def _request(self, method: str, url: str, body: dict[str, Any] | None = None) -> bytes:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/hal+json, application/json",
                   "Authorization": self._authorization()}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        where = one_line(f"{method} {urllib.parse.urlsplit(url).path}", 200)  # the path may be the server's
        try:
            # No redirects: a DDI resource does not move, and the token must not follow one elsewhere.
            with urllib.request.build_opener(_NoRedirects()).open(request, timeout=self.timeout) as response:
                raw = response.read(DOCUMENT_CAP + 1)
        except urllib.error.HTTPError as e:
            with e:
                code = e.code
            if code in (401, 403):
                raise Refused(f"{where}: HTTP {code}: the server refuses this device's token") from None
            if code == 404:
                raise NotFound(f"{where}: HTTP 404") from None
            if code >= 500 or code in (408, 429):
                raise Unreachable(f"{where}: HTTP {code}") from None
            raise Garbage(f"{where}: HTTP {code}") from None
        except (socket.timeout, TimeoutError):
            raise Unreachable(f"{where}: timed out after {self.timeout:.0f} s") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
            raise Unreachable(f"{where}: {one_line(text, 120)}") from None
        if len(raw) > DOCUMENT_CAP:
            raise Garbage(f"{where}: the answer is larger than {DOCUMENT_CAP // 1024} KiB")
        return raw


def _plain(href: str) -> str:
    """A link as a URL may be written: printable ASCII without spaces (a server's control characters
    never get as far as a request line or a log)."""
    if not href or any(not 33 <= ord(c) <= 126 for c in href):
        raise Garbage("a link with spaces, control or non-ASCII characters refused")
    return href


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        raise Garbage(f"{req.get_method()} {urllib.parse.urlsplit(req.full_url).path}: HTTP {code} redirect refused")
