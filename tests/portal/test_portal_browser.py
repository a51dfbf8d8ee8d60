"""End to end in headless Chromium: sign in, create a rollout from the form, watch it live over
MQTT-over-WebSockets, pause and resume it, reload mid-flight, and see it finish.

Screenshots (1280x800 and a 390x844 phone) are written to tests/portal/artifacts/.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from orchestrator.db import session_scope
from orchestrator.models import DeviceUpdate
from orchestrator.policy import DeviceFilter, RolloutPolicy, Target
from orchestrator.services.device_service import set_tags
from orchestrator.services.group_service import create_group
from orchestrator.services.rollout_planner import create_rollout
from tests.factories import add_devices
from tests.integration.harness import QUICK_REAL, Harness
from tests.portal.conftest import make_token

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

DEVICES = 12
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
IN_FLIGHT = ("OFFERED", "DOWNLOADING", "DOWNLOADED", "VERIFIED", "INSTALLING", "REBOOTING")


def shown_counts(page: Any) -> dict[str, int]:
    """The per-state counters as the page shows them, read in one go: the page re-renders on every
    summary, so reading node by node could mix two renders."""
    pairs = page.eval_on_selector_all(
        "#rollout-counts [data-count]", "els => els.map(e => [e.dataset.count, e.textContent])"
    )
    return {state: int(text) for state, text in pairs}


def shown_percent(page: Any) -> float:
    return float(page.locator("#rollout-percent").inner_text().rstrip("%"))


def test_rollout_from_the_portal_end_to_end(portal_harness: Harness, browser: Any, artifacts: Path) -> None:
    h = portal_harness
    prefix = "web-"
    slow = {**QUICK_REAL, "install_time": "0.5:1.5"}
    h.start_fleet(DEVICES, prefix=prefix, params=slow)
    firmware_id = h.add_sample_firmware()
    secret = make_token(h.database_url, "operator")
    base = h.stack.api_url
    console_errors: list[str] = []

    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console_errors.append(str(e)))

    # Sign in: the token is kept in local storage and the fleet overview appears.
    page.goto(f"{base}/")
    page.fill("#token", secret)
    page.click("#login-form button[type=submit]")
    page.wait_for_function(f"document.querySelector('#device-total')?.textContent === '{DEVICES}'")
    assert page.locator("#fleet-table").inner_text().count("sensor-v2") == 1
    page.goto(f"{base}/#/firmware")
    page.wait_for_selector("#firmware-table td:has-text('1.1.0')")

    # New rollout from the form.
    page.click("a[data-nav=new]")
    page.wait_for_selector("#rollout-form")
    page.fill("#name", "portal e2e")
    page.select_option("#firmware_id", str(firmware_id))
    page.fill("#target_model", "sensor-v2")
    page.fill("#waves", "25%, 100%")
    page.fill("#success_threshold", "90")
    page.fill("#max_in_flight", "4")
    page.screenshot(path=str(artifacts / "new-rollout-1280x800.png"), full_page=True)
    page.click("#create-rollout")
    page.wait_for_url(re.compile(r".*#/rollouts/\d+$"))
    rollout_id = int(page.url.rsplit("/", 1)[1])
    assert h.status(rollout_id) == "RUNNING"

    # Live over MQTT: devices appear in the table as the rollout proceeds.
    page.wait_for_selector("#live[data-state=on]")
    page.wait_for_selector("#rollout-summary[data-source=mqtt]")
    page.wait_for_function("document.querySelectorAll('#device-table tbody tr').length > 0")

    # Pause: the confirmation names who is affected; then resume.
    page.click("#action-pause")
    dialog_text = page.locator("#confirm-text").inner_text()
    assert "not started yet" in dialog_text
    page.click("#confirm-ok")
    page.wait_for_selector("#rollout-status[data-status=PAUSED]")
    assert h.status(rollout_id) == "PAUSED"
    page.click("#action-resume")
    assert "not started yet" in page.locator("#confirm-text").inner_text()
    page.click("#confirm-ok")
    page.wait_for_selector("#rollout-status[data-status=RUNNING]")

    # Mid-flight: wait for devices busy updating, then screenshot at both sizes.
    page.wait_for_function(
        "[...document.querySelectorAll('#rollout-counts [data-count]')]"
        f".some(n => {list(IN_FLIGHT)!r}.includes(n.dataset.count))"
        " && parseFloat(document.querySelector('#rollout-percent').textContent) < 100"
    )
    page.screenshot(path=str(artifacts / "rollout-midflight-1280x800.png"), full_page=True)
    phone = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    phone.add_init_script(f"localStorage.setItem('fleet.portal.token', {secret!r})")
    phone_page = phone.new_page()
    phone_page.set_default_timeout(15_000)
    phone_page.goto(f"{base}/#/rollouts/{rollout_id}")
    phone_page.wait_for_selector("#rollout-summary[data-source=mqtt]")
    phone_page.wait_for_function("document.querySelectorAll('#device-table tbody tr').length > 0")
    phone_page.screenshot(path=str(artifacts / "rollout-midflight-390x844.png"), full_page=True)

    # Reload mid-rollout: the retained topics restore the state at once, on the same page.
    before = shown_percent(page)
    assert before < 100
    page.reload()
    reloaded = time.monotonic()
    page.wait_for_selector("#rollout-summary[data-source=mqtt]", timeout=2_000)
    page.wait_for_function("document.querySelectorAll('#device-table tbody tr').length > 0", timeout=2_000)
    restored_in = time.monotonic() - reloaded
    assert page.url.endswith(f"#/rollouts/{rollout_id}")
    assert sum(shown_counts(page).values()) == DEVICES
    assert shown_percent(page) >= before
    assert restored_in < 2.0

    # The end: counters reach 100 % without any reload or polling.
    done = "document.querySelector('#rollout-percent').textContent === '100%'"
    page.wait_for_function(done, timeout=60_000)
    page.wait_for_selector("#rollout-status[data-status=COMPLETED]", timeout=10_000)
    page.wait_for_function(
        f"document.querySelector('[data-count=SUCCEEDED]')?.textContent === '{DEVICES}'", timeout=10_000
    )
    assert h.wait_status(rollout_id, "COMPLETED", timeout=10) == "COMPLETED"
    assert h.counts(rollout_id) == {"SUCCEEDED": DEVICES}
    rows = page.locator("#device-table tbody tr")
    assert rows.count() == DEVICES
    assert all("100%" in text for text in rows.all_inner_texts())
    assert page.locator("#action-pause").is_disabled()
    assert "null" not in page.locator("#view").inner_text()
    # The chart drew succeeded, failed and in flight over time, and each wave shows how long it took
    page.wait_for_function(
        "(document.querySelector('#progress-svg polyline[data-series=succeeded]')"
        "?.getAttribute('points') || '').split(' ').length >= 2"
    )
    assert page.locator("#chart-legend [data-series=succeeded]").inner_text() == f"Succeeded: {DEVICES}"
    assert page.locator("[data-wave-duration]").count() == 2
    assert all(t.startswith(" · took") for t in page.locator("[data-wave-duration]").all_inner_texts())
    page.screenshot(path=str(artifacts / "rollout-done-1280x800.png"), full_page=True)
    phone_page.wait_for_selector("#rollout-status[data-status=COMPLETED]", timeout=10_000)
    phone_page.screenshot(path=str(artifacts / "rollout-done-390x844.png"), full_page=True)
    assert phone_page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    phone_page.goto(f"{base}/#/rollouts/new")
    phone_page.wait_for_selector("#rollout-form")
    phone_page.screenshot(path=str(artifacts / "new-rollout-390x844.png"), full_page=True)
    phone_page.goto(f"{base}/#/")
    phone_page.wait_for_selector("#fleet-table")
    phone_page.screenshot(path=str(artifacts / "fleet-390x844.png"), full_page=True)

    # A device's page: its update in this rollout and the timeline of its reports and transitions
    device = f"{prefix}00003"
    page.goto(f"{base}/#/rollouts/{rollout_id}")
    page.click(f"#device-table a[data-device-link='{device}']")
    page.wait_for_selector("#device-timeline li[data-kind=report][data-event=SUCCEEDED]")
    assert page.locator("#device-name").inner_text() == device
    assert page.locator("#device-version").inner_text() == "1.1.0"
    assert "SUCCEEDED" in page.locator(f"#device-updates tr[data-rollout='{rollout_id}']").inner_text()
    names = page.eval_on_selector_all("#device-timeline li", "els => els.map(e => e.dataset.event)")
    assert names.index("SUCCEEDED") < names.index("offer")  # newest first
    page.screenshot(path=str(artifacts / "device-1280x800.png"), full_page=True)

    # The lists show the rollout too.
    page.goto(f"{base}/#/rollouts")
    page.wait_for_selector(f"#rollout-table a[href='#/rollouts/{rollout_id}']")
    page.screenshot(path=str(artifacts / "rollouts-1280x800.png"))
    phone.close()
    context.close()
    assert console_errors == []


def test_portal_sets_and_shows_a_window_a_rate_and_skip_reasons(
    portal_harness: Harness, browser: Any, artifacts: Path
) -> None:
    # Given tagged devices on two versions, a saved group of them, and a signed-in operator
    h = portal_harness
    h.start_fleet(4, prefix="pace-a-", params=QUICK_REAL)
    h.start_fleet(2, prefix="pace-b-", params=QUICK_REAL, version="0.9.0", seed=9)
    with session_scope(h.database_url) as session:
        set_tags(
            session, [f"pace-{k}-{i:05d}" for k, n in (("a", 4), ("b", 2)) for i in range(n)], add=["pilot"]
        )
        create_group(session, name="pilots", filter=DeviceFilter(model="sensor-v2", tags=["pilot"]))
    firmware_id = h.add_sample_firmware()
    secret = make_token(h.database_url, "operator")
    base = h.stack.api_url
    console_errors: list[str] = []
    context = browser.new_context(viewport=DESKTOP)
    context.add_init_script(f"localStorage.setItem('fleet.portal.token', {secret!r})")
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console_errors.append(str(e)))

    # When the operator targets the group, running >=1.0 only, with a window opening in 7 s and a rate
    opens = datetime.now(UTC) + timedelta(seconds=7)
    closes = opens + timedelta(minutes=20)  # room for the default 15-minute install timeout
    page.goto(f"{base}/#/rollouts/new")
    page.wait_for_selector("#rollout-form")
    page.fill("#name", "paced")
    page.select_option("#firmware_id", str(firmware_id))
    page.check("#mode_group")
    page.select_option("#target_group", "pilots")
    page.fill("#target_versions", ">=1.0")
    page.fill("#waves", "100%")
    page.fill("#windows", f"{opens.isoformat()}..{closes.isoformat()}")
    page.fill("#rate", "30")
    page.screenshot(path=str(artifacts / "new-rollout-paced-1280x800.png"), full_page=True)
    page.click("#create-rollout")
    page.wait_for_url(re.compile(r".*#/rollouts/\d+$"))
    rollout_id = int(page.url.rsplit("/", 1)[1])

    # Then the page shows the rate, the closed window with devices waiting, and why two were skipped
    page.wait_for_selector("#rollout-summary[data-source=mqtt]")
    assert "30 offers/min" in page.locator("#rollout-rate").inner_text()
    assert "2 incompatible" in page.locator("#rollout-skipped").inner_text()
    page.wait_for_function(
        "(document.querySelector('#rollout-window')?.textContent || '').includes('waiting to install')"
    )
    assert "closed" in page.locator("#rollout-window").inner_text()
    assert h.wait(lambda: h.counts(rollout_id).get("VERIFIED") == 4, 10)
    page.screenshot(path=str(artifacts / "rollout-waiting-for-window-1280x800.png"), full_page=True)
    # and once the window opens, the devices install and the rollout completes
    page.wait_for_selector("#rollout-status[data-status=COMPLETED]", timeout=60_000)
    assert h.counts(rollout_id) == {"SUCCEEDED": 4, "SKIPPED": 2}
    assert "2 incompatible" in page.locator("#rollout-skipped").inner_text()
    assert page.locator("#rollout-windows").inner_text().count(" to ") == 1  # one interval: start to end
    context.close()
    assert console_errors == []


def test_portal_per_device_actions_roles_and_the_audit_page(
    portal_harness: Harness, browser: Any, artifacts: Path
) -> None:
    # Given six slow devices, one of which always gets corrupt bytes, one slot, one attempt each
    h = portal_harness
    slow = {**QUICK_REAL, "install_time": "1.0:1.5"}
    h.start_fleet(5, prefix="act-a-", params=slow)
    h.start_fleet(1, prefix="act-0-", params=slow, fail_rates={"corrupt": 1.0}, seed=11)  # offered first
    rollout_id = h.start_rollout("act-", RolloutPolicy(waves=["100%"], max_in_flight=1, max_attempts=1))
    operator = make_token(h.database_url, "operator", name="ops-web")
    viewer = make_token(h.database_url, "viewer", name="watcher")
    base = h.stack.api_url
    console_errors: list[str] = []

    def page_for(secret: str) -> Any:
        context = browser.new_context(viewport=DESKTOP)
        context.add_init_script(f"localStorage.setItem('fleet.portal.token', {secret!r})")
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: console_errors.append(str(e)))
        return page

    # When the operator lists the queued devices and cancels the last one
    page = page_for(operator)
    page.goto(f"{base}/#/rollouts/{rollout_id}")
    last = "act-a-00004"
    page.wait_for_selector("#device-table tbody tr")
    page.select_option("#device-filters-state", "QUEUED")
    page.wait_for_function(
        "[...document.querySelectorAll('#device-table tbody tr')].every(r => r.dataset.state === 'QUEUED')"
    )
    page.click(f"#device-table tr[data-device='{last}'] [data-device-action=cancel]")
    assert "not been offered" in page.locator("#confirm-text").inner_text()
    page.click("#confirm-ok")
    page.wait_for_selector("#device-action-result")
    # Then it is CANCELED, and the corrupt device, once it has failed, can be retried
    assert {u.device_id: str(u.state) for u in h.updates(rollout_id)}[last] == "CANCELED"
    page.select_option("#device-filters-state", "")
    failing = "act-0-00000"
    retry = f"#device-table tr[data-device='{failing}'] [data-device-action=retry]"
    page.wait_for_selector(retry, timeout=60_000)
    page.click(retry)
    assert "new attempt" in page.locator("#confirm-text").inner_text()
    page.click("#confirm-ok")
    page.wait_for_function(
        "document.querySelector('#device-action-result')?.textContent.includes('attempt 2')"
    )
    page.screenshot(path=str(artifacts / "rollout-device-actions-1280x800.png"), full_page=True)
    # And the audit page lists both, with the operator's token
    page.goto(f"{base}/#/audit")
    page.wait_for_selector("#audit-table tr[data-action='device.retry']")
    text = page.locator("#audit-table").inner_text()
    assert "device.cancel" in text and "api:ops-web" in text and f"device:{failing}" in text
    page.fill("#audit-action", "device.cancel")
    page.click("#audit-form button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#audit-table tbody tr').length === 1")
    page.screenshot(path=str(artifacts / "audit-1280x800.png"), full_page=True)
    # And a viewer sees the same rollout without a single write control
    watcher = page_for(viewer)
    watcher.goto(f"{base}/#/rollouts/{rollout_id}")
    watcher.wait_for_selector("#rollout-summary[data-source=mqtt]")
    watcher.wait_for_selector("#device-table tbody tr")
    assert (
        watcher.locator("#action-pause, #action-abort, [data-device-action], a[data-nav=new]:visible").count()
        == 0
    )
    watcher.goto(f"{base}/#/rollouts/new")
    watcher.wait_for_selector("#viewer-notice")
    assert watcher.locator("#rollout-form").count() == 0
    assert console_errors == []


def test_portal_pages_and_filters_a_2000_device_rollout(
    portal_harness: Harness, browser: Any, artifacts: Path
) -> None:
    # Given 2,000 devices in a rollout: every tenth failed with a checksum error, half succeeded,
    # the rest not offered yet (scheduled for tomorrow, so the engine leaves the rows as they are)
    h = portal_harness
    firmware_id = h.add_sample_firmware()
    with session_scope(h.database_url) as session:
        ids = add_devices(session, 2000, prefix="big-")
        rollout = create_rollout(
            session,
            name="big",
            firmware_id=firmware_id,
            target=Target(device_ids=ids),
            policy=RolloutPolicy(waves=["100%"]),
            start_at=datetime.now(UTC) + timedelta(days=1),
        )
        session.flush()
        rollout_id = rollout.id
        for state, code, pick in (
            ("FAILED", "checksum_mismatch", lambda i: i % 10 == 0),
            ("SUCCEEDED", None, lambda i: i % 10 in (1, 2, 3, 4, 5)),
        ):
            chosen = [d for n, d in enumerate(ids) if pick(n)]
            session.execute(
                update(DeviceUpdate)
                .where(DeviceUpdate.rollout_id == rollout_id, DeviceUpdate.device_id.in_(chosen))
                .values(state=state, error_code=code, progress=100 if state == "SUCCEEDED" else 40)
            )
    secret = make_token(h.database_url, "viewer")
    context = browser.new_context(viewport=DESKTOP)
    context.add_init_script(f"localStorage.setItem('fleet.portal.token', {secret!r})")
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    rows = "#device-table tbody tr"

    def shown_ids() -> list[str]:
        return page.eval_on_selector_all(rows, "els => els.map(e => e.dataset.device)")

    # When the rollout page opens, it shows the first page of 50, in device id order
    page.goto(f"{h.stack.api_url}/#/rollouts/{rollout_id}")
    page.wait_for_function("document.querySelector('#devices-page-info')?.textContent.includes('of 2000')")
    assert shown_ids() == ids[:50]
    # Then paging forward twice and back once lands on the second page
    page.click("#devices-page-next")
    page.wait_for_function("document.querySelector('#devices-page-info').textContent.startsWith('Page 2')")
    page.click("#devices-page-next")
    page.wait_for_function("document.querySelector('#devices-page-info').textContent.startsWith('Page 3')")
    assert shown_ids() == ids[100:150]
    page.click("#devices-page-prev")
    page.wait_for_function("document.querySelector('#devices-page-info').textContent.startsWith('Page 2')")
    assert page.locator("#devices-page-info").inner_text() == "Page 2 · 51\u2013100 of 2000"
    assert shown_ids() == ids[50:100]
    # And a state filter counts and pages the 200 failed devices, 200 to a page
    page.select_option("#device-filters-state", "FAILED")
    page.wait_for_function("document.querySelector('#devices-page-info').textContent.endsWith('of 200')")
    page.select_option("#devices-page-size", "200")
    page.wait_for_function(f"document.querySelectorAll({rows!r}).length === 200")
    assert shown_ids() == ids[::10]
    assert page.locator("#devices-page-next").is_disabled()
    assert set(page.eval_on_selector_all(rows, "els => els.map(e => e.dataset.state)")) == {"FAILED"}
    # And the id search and the error filter narrow it on the server
    page.fill("#device-filters-q", "big-0012")
    page.fill("#device-filters-error_code", "checksum_mismatch")
    page.click("#device-filters button[type=submit]")
    page.wait_for_function(f"document.querySelectorAll({rows!r}).length === 1")
    assert shown_ids() == ["big-00120"]
    page.screenshot(path=str(artifacts / "rollout-2000-filtered-1280x800.png"), full_page=True)
    # And the fleet page lists the devices too, paged and searchable
    page.goto(f"{h.stack.api_url}/#/")
    page.wait_for_selector("#fleet-devices tbody tr")
    assert page.locator("#fleet-devices tbody tr").count() == 50
    page.fill("#fleet-filters-q", "big-0199")
    page.click("#fleet-filters button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#fleet-devices tbody tr').length === 10")
    page.click("#fleet-devices a[data-device-link='big-01990']")
    page.wait_for_selector("#device-updates tr[data-rollout]")
    assert page.locator("#device-name").inner_text() == "big-01990"
    context.close()
    assert errors == []
