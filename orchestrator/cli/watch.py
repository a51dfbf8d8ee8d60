"""Live rollout progress from the retained MQTT portal topics (what the web portal shows).

:func:`watch_rollout_portal` subscribes to ``fleet/v1/portal/rollouts/{id}`` (the summary) and to its
per-device topics, and draws progress bars per wave and per update state until the rollout ends.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from orchestrator.mqtt_link import BrokerAddress
from orchestrator.protocol import PortalDevice, PortalRollout, portal_rollout_topic
from orchestrator.state_machines import UpdateState

END_STATUSES = ("COMPLETED", "HALTED", "ABORTED")
_STATE_ORDER = [str(s) for s in UpdateState]
_STATE_STYLE = {
    "SUCCEEDED": "green",
    "FAILED": "red",
    "ROLLED_BACK": "red",
    "TIMED_OUT": "red",
    "CANCELED": "yellow",
    "SKIPPED": "bright_black",
}
_STATUS_STYLE = {"COMPLETED": "green", "HALTED": "red", "ABORTED": "yellow", "PAUSED": "yellow"}


class WatchError(Exception):
    """The broker could not be reached or refused the connection."""


@dataclass
class _View:
    """What the screen shows: the latest summary and the most recent device changes."""

    rollout_id: int
    summary: PortalRollout | None = None
    changes: deque[PortalDevice] = field(default_factory=lambda: deque(maxlen=4))

    def render(self) -> RenderableType:
        if self.summary is None:
            return Text(
                f"waiting for {portal_rollout_topic(self.rollout_id)} … "
                "(does the rollout exist? is `fleet ingest` running?)",
                style="dim",
            )
        s = self.summary
        style = _STATUS_STYLE.get(s.status, "cyan")
        eta = f"  eta {s.eta_seconds:.0f}s" if s.eta_seconds is not None and s.status == "RUNNING" else ""
        head = Text.assemble(
            (f"rollout {s.rollout_id} ", "bold"),
            (f"{s.name}  ", ""),
            (s.status, f"bold {style}"),
            f"  {s.percent:.1f}% done{eta}",
        )
        bars = Table.grid(padding=(0, 1))
        bars.add_column(min_width=22)
        bars.add_column(width=40)
        bars.add_column(justify="right")
        bars.add_column(justify="right")
        total_done = sum(int(w["done"]) for w in s.waves)
        total_size = sum(int(w["size"]) for w in s.waves)
        _bar_row(bars, Text("all devices", style="bold"), total_done, total_size)
        for wave in s.waves:
            label = f"wave {wave['index']} {wave['status']}"
            _bar_row(bars, Text(label), int(wave["done"]), int(wave["size"]))
        states = Table.grid(padding=(0, 1))
        states.add_column(min_width=22)
        states.add_column(width=40)
        states.add_column(justify="right")
        states.add_column(justify="right")
        for state in _ordered_states(s.counts):
            colour = _STATE_STYLE.get(state, "cyan")
            _bar_row(states, Text(state, style=colour), s.counts[state], s.total, colour)
        parts: list[RenderableType] = [head, bars, Text("by state", style="bold"), states]
        if self.changes:
            recent = ", ".join(
                f"{d.device_id} {d.state}" + (f" {d.progress}%" if d.state == "DOWNLOADING" else "")
                for d in reversed(self.changes)
            )
            parts.append(Text(f"last changes: {recent}", style="dim", overflow="ellipsis", no_wrap=True))
        return Group(*parts)


def _ordered_states(counts: dict[str, int]) -> list[str]:
    known = [s for s in _STATE_ORDER if counts.get(s)]
    return known + sorted(s for s in counts if s not in _STATE_ORDER and counts[s])


def _bar_row(table: Table, label: Text, done: int, total: int, colour: str = "green") -> None:
    percent = 100.0 * done / total if total else 0.0
    bar = ProgressBar(total=max(total, 1), completed=done, width=40, complete_style=colour)
    table.add_row(label, bar, f"{done}/{total}", f"{percent:5.1f}%")


def summary_table(summary: PortalRollout) -> RenderableType:
    """The final per-wave and per-state tables."""
    waves = Table("wave", "status", "devices", "done", "succeeded", title=f"rollout {summary.rollout_id}")
    for wave in summary.waves:
        waves.add_row(
            str(wave["index"]),
            str(wave["status"]),
            str(wave["size"]),
            str(wave["done"]),
            str(wave["succeeded"]),
        )
    states = Table("state", "devices", "share")
    for state in _ordered_states(summary.counts):
        count = summary.counts[state]
        share = 100.0 * count / summary.total if summary.total else 0.0
        states.add_row(state, str(count), f"{share:.1f}%")
    style = _STATUS_STYLE.get(summary.status, "cyan")
    line = Text.assemble(
        f"rollout {summary.rollout_id} '{summary.name}' is ",
        (summary.status, f"bold {style}"),
        f": {summary.percent:.1f}% of {summary.total} device updates finished",
    )
    return Group(waves, states, line)


def _connect(
    broker_url: str,
    rollout_id: int,
    inbox: queue.Queue[tuple[str, bytes]],
    username: str | None,
    password: str | None,
    connect_timeout: float,
) -> mqtt.Client:
    address = BrokerAddress.parse(broker_url)
    summary_topic = portal_rollout_topic(rollout_id)
    connected = threading.Event()
    refused: list[str] = []
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"portal-watch-{uuid.uuid4().hex[:12]}",  # the portal login's client-id rule
        protocol=mqtt.MQTTv311,
        transport=address.transport,  # type: ignore[arg-type]
    )
    if address.transport == "websockets":
        client.ws_set_options(path=address.path)
    if username:
        client.username_pw_set(username, password)

    def on_connect(c: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            refused.append(str(reason))
            connected.set()
            return
        # Subscribing here also restores the subscriptions after a reconnect.
        c.subscribe([(summary_topic, 1), (f"{summary_topic}/devices/+", 0)])
        connected.set()

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        inbox.put((message.topic, bytes(message.payload)))

    client.on_connect = on_connect
    client.on_message = on_message
    client.reconnect_delay_set(1, 5)
    try:
        client.connect(address.host, address.port, keepalive=30)
    except OSError as exc:
        raise WatchError(
            f"cannot connect to the MQTT broker at {broker_url} ({exc}); is it running? "
            "set FLEET_MQTT_URL or pass --broker"
        ) from exc
    client.loop_start()
    if not connected.wait(connect_timeout) or refused:
        client.loop_stop()
        client.disconnect()
        why = refused[0] if refused else "no answer"
        raise WatchError(
            f"the MQTT broker at {broker_url} did not accept the connection ({why}); "
            "check --broker, --username and --password (FLEET_PORTAL_MQTT_USERNAME/PASSWORD)"
        )
    return client


def watch_rollout_portal(
    broker_url: str,
    rollout_id: int,
    *,
    username: str | None = None,
    password: str | None = None,
    timeout: float | None = None,
    console: Console | None = None,
    connect_timeout: float = 10.0,
) -> str:
    """Draw live progress of a rollout from its retained portal topics until it is COMPLETED, HALTED
    or ABORTED (then print a summary table), ``timeout`` seconds pass, or Ctrl-C.

    Returns the last status seen ("UNKNOWN" if no summary arrived).
    """
    console = console or Console()
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client = _connect(broker_url, rollout_id, inbox, username, password, connect_timeout)
    summary_topic = portal_rollout_topic(rollout_id)
    view = _View(rollout_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with Live(view.render(), console=console, refresh_per_second=8, transient=False) as live:
            while view.summary is None or view.summary.status not in END_STATUSES:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                try:
                    topic, payload = inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                changed = _apply(view, summary_topic, topic, payload)
                # Drain what is queued before redrawing (a burst of retained device documents).
                while not inbox.empty() and (view.summary is None or view.summary.status not in END_STATUSES):
                    changed = _apply(view, summary_topic, *inbox.get_nowait()) or changed
                if changed:
                    live.update(view.render())
    except KeyboardInterrupt:
        pass
    finally:
        client.loop_stop()
        client.disconnect()
    if view.summary is None:
        console.print(f"[yellow]no progress seen on {summary_topic}[/]")
        return "UNKNOWN"
    console.print(summary_table(view.summary))
    return view.summary.status


def _apply(view: _View, summary_topic: str, topic: str, payload: bytes) -> bool:
    if not payload:  # a cleared retained topic
        return False
    try:
        doc = json.loads(payload)
        if topic == summary_topic:
            summary = PortalRollout.model_validate(doc)
            if view.summary is not None and summary.ts < view.summary.ts:
                return False  # an older document delivered late
            view.summary = summary
        else:
            view.changes.append(PortalDevice.model_validate(doc))
    except (ValueError, ValidationError):
        return False
    return True
