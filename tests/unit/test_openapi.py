"""recovery/updated/openapi.json against the server: the same routes and methods both ways, and real
answers of a running reflashd that fit the documented schemas and status codes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mkimage.publish import publish
from recovery.updated.api import OPENAPI, Service, make_app
from recovery.updated.operations import Operations
from recovery.updated.updater import Updater

from .reflashctl_support import Releases, ServerState, System, http_server
from .reflashd_support import Answer, Daemon, running_daemon

DOC = json.loads(OPENAPI.read_text())


def problems(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """What in `value` does not fit `schema`: the part of OpenAPI 3.0's schemas this document uses
    ($ref, type, nullable, enum, required, properties, items)."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        return problems(value, DOC["components"]["schemas"][name], where)
    if value is None:
        return [] if schema.get("nullable") else [f"{where} is null"]
    kinds = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool, "number": (int, float)}
    kind = schema.get("type")
    if kind is not None and (not isinstance(value, kinds[kind]) or (kind == "integer" and isinstance(value, bool))):
        return [f"{where} is not {kind}: {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where} = {value!r} is not one of {schema['enum']}"]
    found = []
    if isinstance(value, dict):
        found += [f"{where} lacks {key}" for key in schema.get("required", ()) if key not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                found += problems(value[key], sub, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += problems(item, schema["items"], f"{where}[{i}]")
    return found


def test_the_checker_finds_what_is_wrong() -> None:
    schema = {"$ref": "#/components/schemas/Error"}
    assert problems({"error": "x", "kind": "rejected"}, schema) == []
    assert set(problems({"error": 3}, schema)) == {"$.error is not string: 3", "$ lacks kind"}
    assert problems(None, schema) == ["$ is null"]
    status = {"$ref": "#/components/schemas/Status"}
    assert any("state" in p for p in problems({"state": "sleeping"}, status))


def test_every_route_is_documented_and_every_documented_route_exists(system: System) -> None:
    app = make_app(Service(Operations(Updater(system.config)), reboot=lambda: None), token="t")
    served = {(route.method, route.resource.canonical) for route in app.router.routes()}
    documented = {(method.upper(), path) for path, item in DOC["paths"].items() for method in item}
    assert served == documented


def test_every_documented_operation_names_its_answers() -> None:
    for path, item in DOC["paths"].items():
        for method, operation in item.items():
            assert "200" in operation["responses"] or "202" in operation["responses"], (method, path)
            if path.startswith("/api/"):
                assert "401" in operation["responses"], (method, path)
            if method == "post":
                assert {"400", "401", "405", "415"} <= set(operation["responses"]), path


def fits(answer: Answer, method: str, path: str) -> None:
    """`answer` is one the document names for `method path`, and its body fits that schema."""
    responses = DOC["paths"][path][method.lower()]["responses"]
    assert str(answer.status) in responses, f"{method} {path} answered {answer.status}, not documented"
    content = responses[str(answer.status)].get("content", {})
    if "application/json" in content and "schema" in content["application/json"]:
        assert problems(answer.body, content["application/json"]["schema"]) == [], (method, path, answer.body)


@pytest.fixture
def daemon(system: System, releases: Releases, tmp_path: Path) -> Iterator[tuple[Daemon, str]]:
    out = tmp_path / "published"
    publish([releases.bundles["2.0.0"]], out, key=releases.pem, notes={"2.0.0": "Notes."})
    state = ServerState(files={f"/updates/{p.name}": p.read_bytes() for p in out.iterdir()})
    with http_server(state) as url, running_daemon(system, feed=f"{url}/updates/") as d:
        yield d, url


def test_real_answers_fit_the_document(daemon: tuple[Daemon, str]) -> None:
    d, url = daemon
    fits(d.tcp("GET", "/api/status"), "GET", "/api/status")
    fits(d.tcp("GET", "/api/status", token="wrong"), "GET", "/api/status")
    fits(d.tcp("GET", "/api/download"), "GET", "/api/download")
    fits(d.tcp("GET", "/api/openapi.json"), "GET", "/api/openapi.json")
    assert d.tcp("GET", "/api/openapi.json").body == DOC
    fits(d.tcp("POST", "/api/check", {}), "POST", "/api/check")
    fits(d.tcp("POST", "/api/install", {}), "POST", "/api/install")  # nothing downloaded: 422
    fits(d.tcp("POST", "/api/download", {"source": 1}), "POST", "/api/download")
    fits(d.tcp("GET", "/api/cancel"), "POST", "/api/cancel")  # 405
    started = d.tcp("POST", "/api/download", {"source": f"{url}/updates/demo-appliance-2.0.0.bundle"})
    fits(started, "POST", "/api/download")
    assert started.status == 202
    fits(d.tcp("GET", "/api/status"), "GET", "/api/status")  # while downloading (or just done)
    d.wait(lambda s: s["operation"] is None)
    fits(d.tcp("GET", "/api/status"), "GET", "/api/status")
    fits(d.tcp("POST", "/api/download", {"latest": True}), "POST", "/api/download")  # the same release again
    d.wait(lambda s: s["operation"] is None)
    installed = d.tcp("POST", "/api/install", {"reboot": "2099-01-01T00:00:00Z"})
    fits(installed, "POST", "/api/install")
    assert installed.status == 200
    fits(d.tcp("GET", "/api/status"), "GET", "/api/status")
    fits(d.tcp("POST", "/api/cancel", {"discard": True}), "POST", "/api/cancel")
    fits(d.tcp("POST", "/api/confirm", {}), "POST", "/api/confirm")
    fits(d.tcp("POST", "/api/confirm", b"x", headers={"Content-Type": "text/plain"}), "POST", "/api/confirm")
