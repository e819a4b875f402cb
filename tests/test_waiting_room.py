"""The waiting-room page in a real headless Chromium (Debian's, driven by Playwright).

One ticket; a holder has the offer, A and B wait. B watches the page: it shows place 2,
moves to place 1 live when A leaves (no reload), turns into the offer with its countdown
when the holder releases, and buying from the page ends in "Purchased".
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import unique

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("purchase_job")]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
PHONE = {"width": 390, "height": 844}
SCREENSHOT = Path("/tmp/waiting-room.png")
LIVE_UPDATE_S = 2.5  # SSE polls the line every 0.4 s; the goal is about a second


@pytest.fixture
async def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: scripts/system-deps.sh installs it")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=120_000)
        try:
            yield b
        finally:
            await b.close()


async def join(http, auth_headers, event_id, user):
    async with http.post(f"/api/events/{event_id}/queue", json={"quantity": 1},
                         headers=auth_headers(user)) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_waiting_room_updates_live_and_buys(http, auth_headers, token_for, make_event,
                                                  serve_url, browser):
    from playwright.async_api import expect

    event = await make_event(total_tickets=1, name="Phone Night")
    eid = event["id"]
    holder, a, b = unique("holder"), unique("a"), unique("b")
    assert (await join(http, auth_headers, eid, holder))["status"] == "offered"
    await join(http, auth_headers, eid, a)
    assert (await join(http, auth_headers, eid, b))["position"] == 2

    context = await browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True,
                                        has_touch=True)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(f"{serve_url}/events/{eid}/waiting-room?token={token_for(b)}",
                    timeout=60_000)
    await expect(page.locator("#event-name")).to_have_text("Phone Night", timeout=30_000)
    await expect(page.locator("#status")).to_have_text("waiting", timeout=30_000)
    await expect(page.locator("#position")).to_have_text("2")
    assert "token=" not in page.url  # the page takes the token out of the address bar
    await page.evaluate("window.__sameDocument = true")

    # A leaves: B's page moves to place 1 by itself.
    async with http.delete(f"/api/events/{eid}/queue/me", headers=auth_headers(a)) as r:
        assert r.status == 200, await r.text()
    left_at = time.monotonic()
    await expect(page.locator("#position")).to_have_text("1", timeout=10_000)
    took = time.monotonic() - left_at
    assert took < LIVE_UPDATE_S, f"the page took {took:.2f} s to show the new place"
    assert await page.evaluate("window.__sameDocument === true"), "the page reloaded"

    # The holder declines: A is gone, so the offer goes to B, with its countdown.
    async with http.post(f"/api/events/{eid}/queue/me/release", headers=auth_headers(holder)) as r:
        assert r.status == 200, await r.text()
    await expect(page.locator("#status")).to_have_text("offered", timeout=10_000)
    await expect(page.locator("#offer")).to_be_visible()
    await expect(page.locator("#waiting")).to_be_hidden()
    await expect(page.locator("#countdown")).to_have_text(re.compile(r"^(30:00|29:[0-5]\d)$"))
    await expect(page.locator("#offer-qty")).to_have_text("1")
    buy = page.locator("#buy")
    await expect(buy).to_be_visible()
    await expect(buy).to_be_enabled()
    box = await buy.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    assert box["height"] >= 40  # a comfortable tap target
    no_scroll = await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert no_scroll, "the page scrolls sideways on a phone"
    await page.screenshot(path=str(SCREENSHOT.with_name("waiting-room-offer.png")), full_page=True)

    await buy.click()
    await expect(page.locator("#result")).to_contain_text("Purchased", timeout=60_000)
    await expect(page.locator("#status")).to_have_text("purchased", timeout=30_000)
    await expect(page.locator("#error")).to_have_text("")
    await page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert not errors, errors

    async with http.get(f"/api/users/{b}/tickets", headers=auth_headers(b)) as r:
        tickets = await r.json()
    assert len(tickets) == 1 and tickets[0]["event_id"] == eid
    await context.close()


async def test_waiting_room_explains_a_bad_token(serve_url, make_event, browser):
    from playwright.async_api import expect

    event = await make_event()
    context = await browser.new_context(viewport=PHONE)
    page = await context.new_page()
    await page.goto(f"{serve_url}/events/{event['id']}/waiting-room?token=forged", timeout=60_000)
    await expect(page.locator("#error")).to_contain_text("token", timeout=30_000)
    await context.close()
