"""The agent's persistent state: one small JSON document, written atomically.

What must survive a restart (process kill, power loss, the reboot of an update):
the active slot and running version, the report ``seq`` counter, the job in progress (which
update/attempt, its firmware reference, its phase) and the final report of recently finished
updates, so that an update_id is never installed twice and a lost final report can be re-sent.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from orchestrator.protocol import FirmwareRef

Slot = Literal["a", "b"]
STATE_FORMAT = 1
# Finished updates kept for idempotency; older ones are forgotten (the orchestrator never goes
# that far back: a device has one update in flight at a time).
FINISHED_KEEP = 16


class Phase:
    """Phases of a job. Strings, because they are stored as they are in the JSON file."""

    DOWNLOAD = "download"  # downloading / verifying (may resume)
    VERIFIED = "verified"  # image complete and verified, waiting for the install stage
    INSTALLING = "installing"  # installer running: a restart here means the install was interrupted
    REBOOTING = "rebooting"  # installed into the other slot; next step is boot confirmation


@dataclass(slots=True)
class Job:
    """The update the agent is working on."""

    update_id: int
    attempt: int
    firmware: FirmwareRef
    phase: str = Phase.DOWNLOAD
    install_requested: bool = False
    offset: int = 0  # bytes of the image received so far (checkpointed at each progress report)
    install_before: float | None = None  # the maintenance window closes: do not begin after this

    def to_dict(self) -> dict[str, Any]:
        return {
            "update_id": self.update_id,
            "attempt": self.attempt,
            "firmware": self.firmware.model_dump(mode="json"),
            "phase": self.phase,
            "install_requested": self.install_requested,
            "offset": self.offset,
            "install_before": self.install_before,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(
            update_id=int(data["update_id"]),
            attempt=int(data["attempt"]),
            firmware=FirmwareRef.model_validate(data["firmware"]),
            phase=str(data.get("phase", Phase.DOWNLOAD)),
            install_requested=bool(data.get("install_requested", False)),
            offset=int(data.get("offset", 0)),
            install_before=data.get("install_before"),
        )


@dataclass(slots=True)
class AgentState:
    """In-memory copy of the persisted state."""

    slot: Slot = "a"
    running_version: str = "0.0.0"
    previous_version: str | None = None
    seq: int = 0
    boot_count: int = 0
    job: Job | None = None
    # Final reports of finished updates, oldest first: dicts with update_id, attempt, state,
    # error, detail and "installed" (the install step was reached, so never install it again).
    finished: list[dict[str, Any]] = field(default_factory=list)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def find_finished(self, update_id: int) -> dict[str, Any] | None:
        for entry in reversed(self.finished):
            if entry["update_id"] == update_id:
                found: dict[str, Any] = entry
                return found
        return None

    def record_finished(self, entry: dict[str, Any]) -> None:
        self.finished = [e for e in self.finished if e["update_id"] != entry["update_id"]]
        self.finished.append(entry)
        del self.finished[:-FINISHED_KEEP]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "slot": self.slot,
            "running_version": self.running_version,
            "previous_version": self.previous_version,
            "seq": self.seq,
            "boot_count": self.boot_count,
            "job": self.job.to_dict() if self.job else None,
            "finished": self.finished,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentState:
        slot = data.get("slot", "a")
        if slot not in ("a", "b"):
            raise ValueError(f"bad slot {slot!r} in state file")
        job = data.get("job")
        return cls(
            slot=slot,
            running_version=str(data["running_version"]),
            previous_version=data.get("previous_version"),
            seq=int(data.get("seq", 0)),
            boot_count=int(data.get("boot_count", 0)),
            job=Job.from_dict(job) if job else None,
            finished=list(data.get("finished", [])),
        )


class StateStore(Protocol):
    """Where an agent keeps its state."""

    def load(self) -> AgentState | None: ...

    def save(self, state: AgentState) -> None: ...

    @property
    def image_dir(self) -> Path | None: ...


class MemoryStateStore:
    """No persistence: for throughput runs of the simulator (a restart starts from scratch)."""

    __slots__ = ()

    def load(self) -> AgentState | None:
        return None

    def save(self, state: AgentState) -> None:
        return None

    @property
    def image_dir(self) -> Path | None:
        return None


class JsonStateStore:
    """``<dir>/state.json``, replaced atomically (write a temporary file, then rename over it)."""

    __slots__ = ("_durable", "directory")

    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        self.directory = directory
        # fsync file and directory: needed on a real device (power loss), skipped by the simulator
        # where thousands of agents share one disk and a crash loses the whole process anyway.
        self._durable = durable

    @property
    def path(self) -> Path:
        return self.directory / "state.json"

    @property
    def image_dir(self) -> Path | None:
        return self.directory / "images"

    def load(self) -> AgentState | None:
        """The saved state, or None when there is none yet."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return AgentState.from_dict(json.loads(raw))

    def save(self, state: AgentState) -> None:
        """Write the state so that a crash at any point leaves the old or the new file, whole."""
        self.directory.mkdir(parents=True, exist_ok=True)
        data = json.dumps(state.to_dict(), separators=(",", ":")).encode()
        tmp = self.directory / "state.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        if self._durable:
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                with contextlib.suppress(OSError):
                    os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
