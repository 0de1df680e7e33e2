"""``dispatcher unsubscribe-server``: RFC 8058 one-click POSTs, the page a person sees
(in a real Chromium through Playwright), forged tokens, and the command itself."""

from __future__ import annotations

import asyncio
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from _support import missing
from test_dispatcher import DISPATCHER, ROOT

from dispatcher.compose.templates import Unsubscribe
from dispatcher.loop.suppression import Reason, SuppressionStore
from dispatcher.loop.tokens import make_token, read_token
from dispatcher.loop.unsubscribe_server import UnsubscribeApp, listen

pytestmark = pytest.mark.timeout(60)

SECRET = "test-secret-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"


@dataclass
class Running:
    base: str
    store: SuppressionStore
    app: UnsubscribeApp

    def listed(self) -> dict[str, Reason]:
        return SuppressionStore(self.store.path).reasons()


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    store = SuppressionStore(tmp_path / "suppressions.sqlite")
    app = UnsubscribeApp(store, SECRET)
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app.app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    async with asyncio.timeout(10):
        while not server.started:
            await asyncio.sleep(0.01)
    try:
        yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}", store, app)
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await task
        store.close()


def _http(method: str, url: str, body: bytes | None = None, content_type: str | None = None,
          accept: str | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), {k.lower(): v for k, v in exc.headers.items()}


async def http(*args: str | bytes | None) -> tuple[int, str, dict[str, str]]:
    return await asyncio.to_thread(_http, *args)  # type: ignore[arg-type]


def _url(running: Running, job_id: str = "job-7", rcpt: str = "ada@example.net") -> str:
    # The URL a message carries, as the compose stage renders it.
    header = Unsubscribe(url=running.base + "/u/{{ token }}", secret=SECRET).headers(
        {"id": job_id, "to": [f"Ada <{rcpt}>"]})["List-Unsubscribe"]
    return header.strip("<>")


async def test_one_click_post_suppresses_the_recipient(running: Running) -> None:
    url = _url(running)
    status, _, _ = await http("POST", url, b"List-Unsubscribe=One-Click", "application/x-www-form-urlencoded")
    assert status == 200
    record = next(iter(SuppressionStore(running.store.path).records()))
    assert (record.address, record.reason, record.job_id, record.source) == (
        "ada@example.net", Reason.UNSUBSCRIBE, "job-7", "unsubscribe-server")
    # Twice is still 200 (a provider may retry), and one record.
    status, _, _ = await http("POST", url, b"List-Unsubscribe=One-Click", "application/x-www-form-urlencoded")
    assert status == 200 and len(running.listed()) == 1
    status, text, _ = await http("GET", running.base + "/metrics")
    assert 'dispatcher_suppressions_added_total{reason="unsubscribe"} 1.0' in text
    assert 'dispatcher_unsubscribe_requests_total{method="POST",outcome="unsubscribed"} 2.0' in text


async def test_multipart_one_click_is_accepted(running: Running) -> None:
    body = (b"--b\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--b--\r\n")
    status, _, _ = await http("POST", _url(running), body, "multipart/form-data; boundary=b")
    assert status == 200 and "ada@example.net" in running.listed()


async def test_forged_altered_or_foreign_tokens_are_403_and_change_nothing(running: Running) -> None:
    good = _url(running)
    token = good.rpartition("/")[2]
    body, mac = token.split(".")
    other = make_token(SECRET, "job-7", "eve@example.net").split(".")[0]
    for bad in (f"{other}.{mac}",                                        # another address, the old MAC
                f"{body}.{mac[:-2]}AA",                                   # an altered MAC
                make_token("another-secret-0123456789", "job-7", "ada@example.net"),  # another key
                "garbage", ""):
        for method in ("GET", "POST"):
            status, _, _ = await http(method, f"{running.base}/u/{bad}", b"List-Unsubscribe=One-Click"
                                         if method == "POST" else None, "application/x-www-form-urlencoded")
            assert status == 403, (bad, method, status)
    assert running.listed() == {}
    assert read_token(SECRET, token) == ("job-7", "ada@example.net")


async def test_a_get_never_unsubscribes_and_a_post_without_one_click_is_400(running: Running) -> None:
    url = _url(running)
    status, text, headers = await http("GET", url)
    assert status == 200 and "ada@example.net" in text and "<form method=\"post\">" in text
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"
    await http("HEAD", url)
    status, _, _ = await http("POST", url, b"unsubscribe=yes", "application/x-www-form-urlencoded")
    assert status == 400
    assert running.listed() == {}


def _chromium_or_skip() -> None:
    if not (os.path.exists(CHROMIUM) and shutil.which("chromium")):
        missing(f"{CHROMIUM} is not installed (.ci/run installs Debian's chromium)")


async def test_a_person_unsubscribes_with_the_button_in_a_real_browser(running: Running, tmp_path: Path) -> None:
    _chromium_or_skip()
    from playwright.async_api import async_playwright

    url = _url(running, rcpt="grace.hopper@example.net")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM)
        try:
            # A phone: 390 x 844 CSS pixels, touch, as an iPhone 12-15 reports itself.
            page = await browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                          is_mobile=True, has_touch=True)
            response = await page.goto(url)
            assert response is not None and response.status == 200
            assert await page.inner_text("h1") == "Unsubscribe"
            assert "Stop sending email to grace.hopper@example.net?" in await page.inner_text("main")
            button = page.get_by_role("button", name="Unsubscribe")
            box = await button.bounding_box()
            assert box is not None and box["width"] >= 300 and box["height"] >= 44  # a thumb hits it
            await page.screenshot(path=str(tmp_path / "unsubscribe-page.png"), full_page=True)
            assert running.listed() == {}  # the page alone unsubscribes no one
            await button.click()
            await page.wait_for_selector("text=You are unsubscribed")
            await page.screenshot(path=str(tmp_path / "unsubscribed.png"), full_page=True)
            assert running.listed() == {"grace.hopper@example.net": Reason.UNSUBSCRIBE}
            forged = await page.goto(url[:-3] + "AAA")
            assert forged is not None and forged.status == 403
            assert "not valid" in await page.inner_text("h1")
        finally:
            await browser.close()
    shots = os.environ.get("UNSUBSCRIBE_SCREENSHOTS")  # keep the screenshots to look at them
    if shots:
        for name in ("unsubscribe-page.png", "unsubscribed.png"):
            shutil.copy(tmp_path / name, Path(shots) / name)


async def test_the_command_serves_and_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(*DISPATCHER, "unsubscribe-server", cwd=tmp_path, env=env,
                                                stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 2 and b"unsubscribe.secret is not set" in err
    config = tmp_path / "c.yaml"
    config.write_text(f"unsubscribe:\n  url: https://example.org/u/{{{{ token }}}}\n  secret: ${{UNSUB_SECRET}}\n"
                      f"suppression:\n  path: {tmp_path / 'list.sqlite'}\n")
    proc = await asyncio.create_subprocess_exec(*DISPATCHER, "unsubscribe-server", "--config", str(config),
                                                "--port", "0", cwd=tmp_path, env={**env, "UNSUB_SECRET": SECRET},
                                                stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            line = (await proc.stderr.readline()).decode()
        assert "listening on http://127.0.0.1:" in line, line
        base = line.split("listening on ")[1].split()[0].rstrip("/")
        token = make_token(SECRET, "j1", "bob@example.net")
        status, _, _ = await http("POST", f"{base}/u/{token}", b"List-Unsubscribe=One-Click",
                                  "application/x-www-form-urlencoded")
        assert status == 200
        assert SuppressionStore(tmp_path / "list.sqlite").reasons() == {"bob@example.net": Reason.UNSUBSCRIBE}
    finally:
        proc.terminate()
        async with asyncio.timeout(15):
            await proc.wait()
    assert proc.returncode == 0
    assert SECRET not in (await proc.stderr.read()).decode()  # type: ignore[union-attr]
