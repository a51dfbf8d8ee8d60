"""The downloader against the real HTTP firmware server (no broker)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_sim.downloader import DownloadFailed, FileSink, HashSink, download, image_name
from device_sim.profiles import JobPlan
from orchestrator.protocol import ErrorCode
from tests.device_sim.helpers import SAMPLES, FirmwareServer, firmware_ref, new_id, run


async def _noop_loss(seconds: float) -> None:
    return None


def _fetch(fw: Any, sink: Any, plan: JobPlan | None = None, seen: list[int] | None = None) -> None:
    async def go() -> None:
        async with httpx.AsyncClient() as client:
            await download(
                client,
                fw,
                sink,
                plan or JobPlan(),
                on_progress=(seen.append if seen is not None else lambda _o: None),
                network_loss=_noop_loss,
                retries=1,
            )

    run(go(), timeout=20)


def test_full_download_hashes(firmware_server: FirmwareServer) -> None:
    device = new_id()
    fw = firmware_ref(firmware_server, "gateway-x1", "1.0.0", device=device)
    sink = HashSink()
    seen: list[int] = []
    _fetch(fw, sink, seen=seen)
    assert sink.offset == fw.size and sink.hexdigest() == fw.sha256
    assert seen == sorted(seen) and seen[-1] == fw.size and len(seen) > 5


def test_resume_from_part_file(firmware_server: FirmwareServer, tmp_path: Path) -> None:
    device = new_id()
    fw = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=device)
    data = (SAMPLES / "sensor-v2" / "1.1.0.bin").read_bytes()
    name = image_name(1, fw.sha256)
    (tmp_path / f"{name}.part").write_bytes(data[:12345])
    sink = FileSink(tmp_path, name)
    assert sink.offset == 12345
    _fetch(fw, sink)
    assert sink.hexdigest() == fw.sha256
    path = sink.finish()
    assert path is not None and path.read_bytes() == data
    reqs = firmware_server.requests_for(device)
    assert [(r.range, r.status) for r in reqs] == [("bytes=12345-", 206)]


def test_network_loss_resumes_with_range(firmware_server: FirmwareServer) -> None:
    device = new_id()
    fw = firmware_ref(firmware_server, "gateway-x1", "1.1.0", device=device)
    sink = HashSink()
    _fetch(fw, sink, JobPlan(offline_at=0.5, offline_for=0.0))
    assert sink.hexdigest() == fw.sha256
    ranges = [r.range for r in firmware_server.requests_for(device)]
    assert ranges[0] is None and ranges[1] is not None and int(ranges[1][6:-1]) >= fw.size // 2


def test_corruption_and_errors(firmware_server: FirmwareServer) -> None:
    device = new_id()
    fw = firmware_ref(firmware_server, "sensor-v2", "1.0.0", device=device)
    sink = HashSink()
    _fetch(fw, sink, JobPlan(corrupt=True))
    assert sink.offset == fw.size and sink.hexdigest() != fw.sha256

    with pytest.raises(DownloadFailed) as info:
        _fetch(firmware_ref(firmware_server, "sensor-v2", "1.0.0", device=device, token="wrong"), HashSink())
    assert info.value.code is ErrorCode.DOWNLOAD_ERROR and "401" in info.value.detail

    missing = fw.model_copy(update={"url": fw.url.replace("1.0.0.bin", "7.7.7.bin")})
    with pytest.raises(DownloadFailed, match="404"):
        _fetch(missing, HashSink())

    # Nothing listens on this port: transient errors, retried, then given up.
    dead = fw.model_copy(update={"url": "http://127.0.0.1:9/fw.bin"})
    with pytest.raises(DownloadFailed, match="giving up"):
        _fetch(dead, HashSink())


def test_sink_reset_and_digest() -> None:
    sink = HashSink()
    sink.write(b"abc")
    sink.reset()
    sink.write(b"xyz")
    assert sink.hexdigest() == hashlib.sha256(b"xyz").hexdigest() and sink.offset == 3
