"""HTTP routes of the live panel: history JSON, previews, 404 for unknown runs, path traversal rejected."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from trainer.monitor.runlog import RunLog, read_history

ROOT = Path(__file__).resolve().parents[1]


def _load_routes():
    # Load nodes/routes.py on its own (as ComfyUI would through the pack) without importing nodes/__init__.py,
    # which needs ComfyUI. Its relative import of the engine falls back to the top-level `trainer` package here.
    spec = importlib.util.spec_from_file_location("loralab_routes_under_test", ROOT / "nodes" / "routes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


routes = _load_routes()
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "loralab_runs"
    d = root / "my_run-01"
    with RunLog(d) as log:
        for s in range(1, 21):
            log.log_step(s, 1.0 / s, 1e-4)
        log.mark(10, "preview", "step_000010.png")
        log.write_latest({"v": 1, "node": "5", "run": "my_run-01", "phase": "done", "step": 20}, force=True)
    (d / "estimate.txt").write_text("Memory estimate (cpu): 1.2 GiB of 20 GiB available -> FITS\n")
    (d / "previews").mkdir()
    (d / "previews" / "step_000010.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(b"secret")
    (root / "other").mkdir()
    return root


def test_history_payload(runs):
    data = routes.history_payload(runs, "my_run-01")
    assert data["run"] == "my_run-01"
    assert data["history"] == read_history(runs / "my_run-01")
    assert data["history"]["steps"] == list(range(1, 21))
    assert data["latest"]["phase"] == "done"
    assert data["estimate"].startswith("Memory estimate (cpu)")  # estimate.txt, for the panel's memory tooltip
    # a run folder without files yet: empty history, no latest, no estimate
    empty = routes.history_payload(runs, "other")
    assert empty["history"]["steps"] == [] and empty["latest"] is None and empty["estimate"] is None


@pytest.mark.parametrize("run", ["my lora-0123456789ab", "v1.5_test-abc", "a", "A" * 200, "v1..2-abc"])
def test_run_ids_from_sanitize_name_are_valid(run):
    # Train LoRA names run folders "<sanitize_name(name)>-<key>": letters, digits, "._ -" (spaces inside)
    assert routes.valid_run_id(run)


def test_unknown_run_and_preview_are_not_found(runs):
    with pytest.raises(routes.NotFound):
        routes.history_payload(runs, "nope")
    with pytest.raises(routes.NotFound):
        routes.preview_file(runs, "my_run-01", "step_999999.png")
    assert routes.preview_file(runs, "my_run-01", "step_000010.png").read_bytes() == PNG


@pytest.mark.parametrize("run", ["..", ".", "../x", "a/b", "a\\b", ".hidden", "", "a" * 201, "my_run-01/..",
                                 "%2e%2e", "x\x00y", "run\n", "trailing ", " leading", "tab\tname", "new\nline"])
def test_bad_run_ids_are_rejected(runs, run):
    assert not routes.valid_run_id(run)
    with pytest.raises(routes.BadRequest):
        routes.history_payload(runs, run)


@pytest.mark.parametrize("name", ["../../secret.png", "..", "../secret.png", "a/b.png", ".x.png", "x.txt",
                                  "x.png/..", "step_000010.png\x00.txt", "...png"])
def test_bad_preview_names_are_rejected(runs, name):
    with pytest.raises(routes.BadRequest):
        routes.preview_file(runs, "my_run-01", name)


def test_symlink_out_of_the_root_is_refused(runs, tmp_path):
    link = runs / "escape"
    try:
        link.symlink_to(tmp_path, target_is_directory=True)
    except OSError:
        pytest.skip("symlinks not available")
    with pytest.raises(routes.NotFound):
        routes.history_payload(runs, "escape")


# ---------------------------------------------------------------------------------------------- over HTTP
needs_aiohttp = pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None,
                                   reason="aiohttp (ComfyUI's web server) is not installed: pip install aiohttp")


def _with_client(root, fn):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def main():
        app = web.Application()
        app.add_routes(routes.make_routes(root))
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        try:
            return await fn(client)
        finally:
            await client.close()

    return asyncio.run(main())


@needs_aiohttp
def test_http_history_and_preview(runs):
    async def go(client):
        r = await client.get("/loralab/runs/my_run-01/history")
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
        assert r.headers["Cache-Control"] == "no-store"
        body = json.loads(await r.text())
        assert body["history"]["steps"] == list(range(1, 21))
        assert body["history"]["marks"][0]["file"] == "step_000010.png"
        r = await client.get("/loralab/runs/my_run-01/previews/step_000010.png")
        assert r.status == 200 and r.headers["Content-Type"] == "image/png"
        assert await r.read() == PNG
        r = await client.get("/loralab/runs/unknown/history")
        assert r.status == 404 and "error" in json.loads(await r.text())
        r = await client.get("/loralab/runs/my_run-01/previews/nope.png")
        assert r.status == 404

    _with_client(runs, go)


@needs_aiohttp
def test_http_traversal_is_rejected(runs):
    async def go(client):
        statuses = {}
        for url in ["/loralab/runs/..%2F..%2Fsecret/history",
                    "/loralab/runs/my_run-01/previews/..%2F..%2F..%2Fsecret.png",
                    "/loralab/runs/my_run-01/previews/%2e%2e%2fsecret.png",
                    "/loralab/runs/%2e%2e/history",
                    "/loralab/runs/my_run-01/previews/....png"]:
            r = await client.get(url)
            statuses[url] = r.status
            assert b"secret" not in await r.read()
        assert all(s in (400, 404) for s in statuses.values()), statuses

    _with_client(runs, go)


@needs_aiohttp
def test_handlers_called_directly_reject_traversal(runs):
    """The handlers are plain async functions over a root: 400 for bad ids/names even if a proxy decoded them."""

    class Req:
        def __init__(self, **match_info):
            self.match_info = match_info

    async def go():
        r1 = await routes.handle_history(Req(run=".."), runs)
        r2 = await routes.handle_preview(Req(run="my_run-01", name="../../secret.png"), runs)
        r3 = await routes.handle_history(Req(run="my_run-01"), runs)
        r4 = await routes.handle_history(Req(run="ghost"), runs)
        return r1.status, r2.status, r3.status, r4.status, json.loads(r3.text)

    s1, s2, s3, s4, body = asyncio.run(go())
    assert (s1, s2, s3, s4) == (400, 400, 200, 404)
    assert body["history"]["steps"][-1] == 20


@needs_aiohttp
def test_register_routes_is_idempotent(runs):
    from aiohttp import web

    table = web.RouteTableDef()
    assert routes.register_routes(table) is True
    assert routes.register_routes(table) is False
    paths = sorted(r.path for r in table)
    assert paths == sorted([routes.HISTORY_PATH, routes.PREVIEW_PATH])
    # outside ComfyUI (no `server` module) registering on the PromptServer is a no-op
    if "server" not in sys.modules:
        assert routes.register_routes() is False


def test_history_fixture_of_the_web_tests_matches_the_route(runs):
    """tests/web/fixtures/history_run.json (used by the browser harness) has the route's shape."""
    fixture = json.loads((ROOT / "tests" / "web" / "fixtures" / "history_run.json").read_text())
    live = routes.history_payload(runs, "my_run-01")
    assert set(fixture) == set(live)
    assert set(fixture["history"]) == set(live["history"])
