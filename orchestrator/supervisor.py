"""Keeps a set of child processes alive: restarts a child that died, with backoff and a limit.

Used by ``fleet up``. Call :meth:`Supervisor.check` periodically from the thread that started the
children (their parent-death signal is tied to that thread). A child that exits is restarted after
a short backoff that doubles with each recent restart (up to ``max_backoff``); a child that dies
more than ``max_restarts`` times within ``window`` seconds (unless that is None: never give up),
or a child added with ``restart=False``, makes :meth:`check` raise :class:`SupervisionError`.
:meth:`stop_all` stops the children in the reverse order of :meth:`add`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


class SupervisionError(RuntimeError):
    """A child cannot be kept running."""


class Child(Protocol):
    """What the supervisor needs from a child process (``ManagedProcess`` fits)."""

    @property
    def pid(self) -> int | None: ...
    @property
    def returncode(self) -> int | None: ...
    def is_running(self) -> bool: ...
    def start(self) -> None: ...
    def stop(self, timeout: float = 5.0) -> None: ...


@dataclass
class _Entry:
    name: str
    process: Child
    restart: bool
    stop: Callable[[], None]
    stop_timeout: float
    restarts: deque[float] = field(default_factory=deque)
    due: float | None = None  # monotonic time of a pending restart
    last_pid: int | None = None


class Supervisor:
    """Watches children; see the module docstring.

    ``on_event`` receives one human-readable line per death, restart or give-up (default: the log).
    ``on_restart`` is called with the child's name after each successful restart.
    """

    def __init__(
        self,
        *,
        max_restarts: int | None = 5,
        window: float = 60.0,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        on_event: Callable[[str], None] | None = None,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.on_event = on_event or log.warning
        self.on_restart = on_restart
        self._entries: dict[str, _Entry] = {}

    def add(
        self,
        name: str,
        process: Child,
        *,
        restart: bool = True,
        stop: Callable[[], None] | None = None,
        stop_timeout: float = 15.0,
    ) -> None:
        """Watch ``process`` (already started). With ``restart=False`` its death is fatal.

        ``stop`` replaces ``process.stop(stop_timeout)`` at shutdown (e.g. a server object).
        """
        self._entries[name] = _Entry(
            name=name,
            process=process,
            restart=restart,
            stop=stop or (lambda: process.stop(stop_timeout)),
            stop_timeout=stop_timeout,
            last_pid=process.pid,
        )

    @property
    def names(self) -> list[str]:
        """Children in start order."""
        return list(self._entries)

    def pids(self) -> dict[str, int | None]:
        """Current pid per child."""
        return {name: entry.process.pid for name, entry in self._entries.items()}

    def restart_count(self, name: str) -> int:
        """Restarts of ``name`` within the current window."""
        entry = self._entries[name]
        self._forget_old(entry, time.monotonic())
        return len(entry.restarts)

    def check(self) -> None:
        """Notice dead children and restart those whose backoff has passed.

        Raises :class:`SupervisionError` for an essential child that died or a child over its limit.
        """
        now = time.monotonic()
        for entry in self._entries.values():
            process = entry.process
            if entry.due is None:
                if process.is_running():
                    continue
                code = process.returncode
                _sweep_group(entry.last_pid)
                if not entry.restart:
                    raise SupervisionError(f"{entry.name} exited with status {code}; it cannot be restarted")
                self._forget_old(entry, now)
                if self.max_restarts is not None and len(entry.restarts) >= self.max_restarts:
                    raise SupervisionError(
                        f"{entry.name} exited with status {code}; it died {len(entry.restarts) + 1} times "
                        f"within {self.window:.0f}s, giving up"
                    )
                delay = min(self.backoff * 2 ** len(entry.restarts), self.max_backoff)
                entry.due = now + delay
                self.on_event(
                    f"{entry.name} (pid {entry.last_pid}) exited with status {code}; "
                    f"restarting in {delay:.1f}s"
                )
            elif now >= entry.due:
                entry.due = None
                entry.restarts.append(now)
                process.start()
                entry.last_pid = process.pid
                self.on_event(
                    f"{entry.name} restarted as pid {process.pid} "
                    f"({len(entry.restarts)} restart(s) within {self.window:.0f}s)"
                )
                if self.on_restart is not None:
                    self.on_restart(entry.name)

    def stop_all(self) -> None:
        """Stop every child in reverse start order; also kill what is left in their process groups."""
        for entry in reversed(list(self._entries.values())):
            pid = entry.process.pid
            try:
                entry.stop()
            except Exception:  # keep going: the others must stop too
                log.exception("stopping %s failed", entry.name)
            _sweep_group(pid)

    def _forget_old(self, entry: _Entry, now: float) -> None:
        while entry.restarts and now - entry.restarts[0] > self.window:
            entry.restarts.popleft()


def _sweep_group(pgid: int | None) -> None:
    """SIGKILL whatever still runs in the process group of a child that led its own session
    (e.g. pool processes of a killed Celery worker). Children are started with a new session,
    so the group holds only that child's descendants."""
    if pgid is None or pgid <= 1 or pgid == os.getpgrp():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
