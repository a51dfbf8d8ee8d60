"""A managed child process: PID file, start, wait-until-ready, stop, and stale-process cleanup.

Every server started by :mod:`orchestrator.embedded` runs through :class:`ManagedProcess`. Its PID
file records who owns the child, so :func:`cleanup_stale` can later kill servers whose owner was
killed before it could stop them, and leave alone the servers of owners that are still running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
_PROC = Path("/proc")


class ProcessStartError(RuntimeError):
    """A child process exited, or never became ready, during start-up."""


@dataclass(frozen=True)
class PidRecord:
    """Contents of a PID file (stored as JSON)."""

    name: str
    pid: int
    start_ticks: int | None
    marker: str
    owner_pid: int
    owner_start_ticks: int | None
    cleanup_dir: str | None = None

    def dump(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> PidRecord | None:
        """Parse ``path``; None when it is missing or not a PID file written by this module."""
        try:
            data: Any = json.loads(path.read_text())
            return cls(
                name=str(data["name"]),
                pid=int(data["pid"]),
                start_ticks=_opt_int(data["start_ticks"]),
                marker=str(data["marker"]),
                owner_pid=int(data["owner_pid"]),
                owner_start_ticks=_opt_int(data["owner_start_ticks"]),
                cleanup_dir=None if data.get("cleanup_dir") is None else str(data["cleanup_dir"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


# ------------------------------------------------------------------ /proc helpers
def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux); None if unknown or not running.

    Together with the pid it identifies one process for good: a reused pid has another start time.
    """
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def process_cmdline(pid: int) -> str | None:
    """The command line of ``pid`` with arguments joined by spaces; None if it is not running."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        raw = b""
    if raw:
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()
    if _PROC.is_dir():
        return None if not (_PROC / str(pid)).exists() else ""
    # No procfs (e.g. macOS): ask ps.
    try:
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """True if ``pid`` runs and, when ``start_ticks`` is given, is the same process that had it.

    Zombies count as dead: an orphan's zombie may linger when the init process does not reap.
    """
    if pid <= 0:
        return False
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        stat = ""
    if stat:
        state = stat[stat.rfind(")") + 2 :].split()[0]
        if state in ("Z", "X"):
            return False
        return start_ticks is None or process_start_ticks(pid) == start_ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate_pid(pid: int, start_ticks: int | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds, a process that is not our child."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not process_alive(pid, start_ticks):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and process_alive(pid, start_ticks):
            time.sleep(0.02)


def _parent_death_hook() -> Callable[[], None] | None:
    """A preexec hook making the child receive SIGTERM when its parent dies (Linux only).

    Everything is resolved here, in the parent: between fork and exec only async-signal-safe
    work is wise while other threads exist.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def raise_nofile_limit(pid: int | None = None) -> None:
    """Raise the soft open-files limit to the hard limit, for ``pid`` or this process.

    Brokers need one descriptor per client; the default soft limit (often 1024) is far too low.
    Best effort: failures are ignored.
    """
    try:
        import resource

        if pid is None:
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        elif hasattr(resource, "prlimit"):
            _soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, OSError, ValueError):
        pass


# ------------------------------------------------------------------ managed process
class ManagedProcess:
    """One child process with a PID file and a log file.

    ``marker`` is a string expected in the child's command line (default: the executable's base
    name); :func:`cleanup_stale` checks it before killing anything. ``cleanup_dir``, if given, is
    removed by :func:`cleanup_stale` after killing a stale child (only if it lies inside the PID
    file's directory). With ``die_with_parent`` the child gets SIGTERM when the thread that started
    it exits (Linux ``PR_SET_PDEATHSIG``), so start long-lived servers from a long-lived thread.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        pid_file: Path,
        log_file: Path,
        marker: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        die_with_parent: bool = True,
        cleanup_dir: Path | None = None,
    ) -> None:
        if not argv:
            raise ValueError("argv must not be empty")
        self.argv = [str(a) for a in argv]
        self.name = name
        self.pid_file = pid_file
        self.log_file = log_file
        self.marker = marker or Path(self.argv[0]).name
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.die_with_parent = die_with_parent
        self.cleanup_dir = cleanup_dir
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid once started, else None."""
        return self._popen.pid if self._popen else None

    @property
    def returncode(self) -> int | None:
        """Exit status once the child has exited, else None."""
        return self._popen.poll() if self._popen else None

    def is_running(self) -> bool:
        """True while the child runs."""
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        """Start the child and write its PID file. Precondition: not already running."""
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running")
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log = self.log_file.open("ab")
        self._popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            # Own session: a Ctrl-C in the terminal reaches the owner, which then stops us in order.
            start_new_session=True,
            preexec_fn=_parent_death_hook() if self.die_with_parent else None,
        )
        raise_nofile_limit(self._popen.pid)
        PidRecord(
            name=self.name,
            pid=self._popen.pid,
            start_ticks=process_start_ticks(self._popen.pid),
            marker=self.marker,
            owner_pid=os.getpid(),
            owner_start_ticks=process_start_ticks(os.getpid()),
            cleanup_dir=str(self.cleanup_dir) if self.cleanup_dir else None,
        ).dump(self.pid_file)

    def wait_ready(self, check: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
        """Poll ``check`` until it returns True.

        Raises :class:`ProcessStartError` (with the log's tail) if the child exits first or
        ``timeout`` seconds pass; the child is stopped in the latter case.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                raise ProcessStartError(
                    f"{self.name} exited with status {self.returncode} during start-up:\n{self.log_tail()}"
                )
            if check():
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise ProcessStartError(
                    f"{self.name} not ready after {timeout:.0f}s although it was running (if it listens "
                    "on a loopback port, something may block connections to local ports):\n"
                    f"{self.log_tail()}"
                )
            time.sleep(interval)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child if it runs."""
        if self._popen is not None and self._popen.poll() is None:
            self._popen.send_signal(sig)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the child, SIGKILL it after ``timeout`` seconds, reap it, remove the PID file.

        Safe to call more than once.
        """
        if self._popen is not None and self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.terminate()
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self._popen.kill()
                self._popen.wait(10)
        self.pid_file.unlink(missing_ok=True)
        self._close_log()

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the child's log."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def cleanup_stale(run_dir: Path, timeout: float = 3.0) -> list[int]:
    """Kill servers recorded in ``run_dir/*.pid`` whose owner process is gone; return their pids.

    A server is killed only if its pid still belongs to the process that was started (same start
    time) and its command line contains the recorded marker, so a reused pid is never hit. PID
    files of servers whose owner still runs are left alone (another run may be using them). PID
    files of dead servers are removed, and so are their recorded private directories.
    """
    killed: list[int] = []
    if not run_dir.is_dir():
        return killed
    root = run_dir.resolve()
    for pid_file in sorted(run_dir.glob("*.pid")):
        record = PidRecord.load(pid_file)
        if record is None:
            continue
        if process_alive(record.owner_pid, record.owner_start_ticks):
            continue
        if process_alive(record.pid, record.start_ticks):
            cmdline = process_cmdline(record.pid) or ""
            if record.marker not in cmdline:
                # The pid now belongs to something else: not ours to kill.
                pid_file.unlink(missing_ok=True)
                continue
            _terminate_pid(record.pid, record.start_ticks, timeout)
            killed.append(record.pid)
        pid_file.unlink(missing_ok=True)
        if record.cleanup_dir:
            target = Path(record.cleanup_dir).resolve()
            if target != root and root in target.parents:
                shutil.rmtree(target, ignore_errors=True)
    return killed
