"""The agent's persisted state (no servers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from device_sim.state_store import FINISHED_KEEP, AgentState, Job, JsonStateStore, MemoryStateStore, Phase
from orchestrator.protocol import FirmwareRef
from tests.device_sim.helpers import manifest


def _firmware() -> FirmwareRef:
    return FirmwareRef(**manifest("sensor-v2", "1.1.0"), url="http://x/fw", token="t")


def test_round_trip(tmp_path: Path) -> None:
    store = JsonStateStore(tmp_path / "dev", durable=True)
    assert store.load() is None
    state = AgentState(slot="b", running_version="1.1.0", previous_version="1.0.0", seq=9)
    state.job = Job(
        update_id=4, attempt=2, firmware=_firmware(), phase=Phase.VERIFIED, install_requested=True
    )
    state.record_finished({"update_id": 3, "attempt": 1, "state": "SUCCEEDED", "installed": True})
    store.save(state)
    loaded = store.load()
    assert loaded == state
    assert loaded is not None and loaded.job is not None and loaded.job.firmware.sha256 == _firmware().sha256
    assert store.image_dir == tmp_path / "dev" / "images"
    assert sorted(p.name for p in (tmp_path / "dev").iterdir()) == ["state.json"]  # no temp file left


def test_failed_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = JsonStateStore(tmp_path, durable=False)
    store.save(AgentState(running_version="1.0.0", seq=1))

    def crash(*args: object) -> None:
        raise OSError("power loss")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power loss"):
        store.save(AgentState(running_version="2.0.0", seq=2))
    monkeypatch.undo()
    loaded = store.load()
    assert loaded is not None and loaded.seq == 1 and loaded.running_version == "1.0.0"


def test_seq_and_finished_bookkeeping() -> None:
    state = AgentState(running_version="1.0.0")
    assert [state.next_seq() for _ in range(3)] == [1, 2, 3]
    for update_id in range(FINISHED_KEEP + 5):
        state.record_finished({"update_id": update_id, "attempt": 1, "state": "FAILED", "installed": False})
    assert len(state.finished) == FINISHED_KEEP
    assert state.find_finished(0) is None and state.find_finished(FINISHED_KEEP + 4) is not None
    state.record_finished(
        {"update_id": FINISHED_KEEP + 4, "attempt": 2, "state": "SUCCEEDED", "installed": True}
    )
    entry = state.find_finished(FINISHED_KEEP + 4)
    assert entry is not None and entry["attempt"] == 2
    assert len([e for e in state.finished if e["update_id"] == FINISHED_KEEP + 4]) == 1


def test_rejects_corrupt_slot(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"running_version": "1", "slot": "c"}))
    with pytest.raises(ValueError, match="slot"):
        JsonStateStore(tmp_path).load()


def test_memory_store_keeps_nothing() -> None:
    store = MemoryStateStore()
    store.save(AgentState(running_version="1.0.0"))
    assert store.load() is None and store.image_dir is None
