"""Firmware download: HTTP GET with ``Range`` resume and a bearer token, hashed while it streams."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import httpx

from device_sim.profiles import JobPlan
from orchestrator.protocol import ErrorCode, FirmwareRef

CHUNK_SIZE = 64 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadFailed(Exception):
    """The attempt cannot complete: reported as FAILED with ``code``."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class _Transient(Exception):
    """A failure worth retrying (5xx, connection reset, timeout)."""


class _NetworkLoss(Exception):
    """Injected loss of connectivity: close the transfer, wait, resume with Range."""


class ImageSink(Protocol):
    """Receives the image bytes; knows how many it holds and their sha256."""

    @property
    def offset(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    def reset(self) -> None: ...

    def hexdigest(self) -> str: ...

    def finish(self) -> Path | None: ...

    def discard(self) -> None: ...


class HashSink:
    """Keeps only the running hash: a simulated device has no flash to write to.

    Resuming works within the process (the hash object lives on); a restarted process starts over.
    """

    __slots__ = ("_hash", "offset")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.offset += len(data)

    def reset(self) -> None:
        self._hash = hashlib.sha256()
        self.offset = 0

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def finish(self) -> Path | None:
        return None

    def discard(self) -> None:
        self.reset()


class FileSink:
    """Writes ``<name>.part`` and renames it to ``<name>.img`` when complete.

    On open, an existing part file is re-hashed so the transfer resumes where it stopped, even
    after the agent process was killed.
    """

    __slots__ = ("_file", "_hash", "final_path", "offset", "part_path")

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.part_path = directory / f"{name}.part"
        self.final_path = directory / f"{name}.img"
        self._hash = hashlib.sha256()
        self.offset = 0
        if self.part_path.exists():
            with self.part_path.open("rb") as f:
                while block := f.read(1024 * 1024):
                    self._hash.update(block)
                    self.offset += len(block)
        self._file = self.part_path.open("ab")

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.offset += len(data)

    def reset(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._hash = hashlib.sha256()
        self.offset = 0

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def finish(self) -> Path | None:
        self._file.flush()
        self._file.close()
        self.part_path.replace(self.final_path)
        return self.final_path

    def discard(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.part_path.unlink()

    def close(self) -> None:
        """Close without deleting (the transfer may resume later)."""
        self._file.flush()
        self._file.close()


def image_name(update_id: int, sha256: str) -> str:
    return f"u{update_id}-{sha256[:16]}"


async def download(
    client: httpx.AsyncClient,
    firmware: FirmwareRef,
    sink: ImageSink,
    plan: JobPlan,
    *,
    on_progress: Callable[[int], None],
    network_loss: Callable[[float], Awaitable[None]],
    retries: int,
) -> None:
    """Fill ``sink`` with the image. Raises DownloadFailed when the attempt cannot succeed.

    Does not check the digest: the caller compares ``sink.hexdigest()`` with the manifest.
    """
    failures = 0
    loss_at = int(plan.offline_at * firmware.size) if plan.offline_at is not None else None
    while sink.offset < firmware.size:
        try:
            await _fetch_once(client, firmware, sink, plan, on_progress, loss_at)
        except _NetworkLoss:
            loss_at = None  # one loss per attempt
            await network_loss(plan.offline_for)
            continue
        except _Transient as exc:
            failures += 1
            if failures > retries:
                raise DownloadFailed(
                    ErrorCode.DOWNLOAD_ERROR, f"giving up after {failures} tries: {exc}"
                ) from None
            await asyncio.sleep(min(30.0, 0.5 * 2 ** (failures - 1)))
            continue
        if sink.offset < firmware.size:
            # The server closed early without an error: count it and resume.
            failures += 1
            if failures > retries:
                raise DownloadFailed(ErrorCode.DOWNLOAD_ERROR, "transfer ended early")


async def _fetch_once(
    client: httpx.AsyncClient,
    firmware: FirmwareRef,
    sink: ImageSink,
    plan: JobPlan,
    on_progress: Callable[[int], None],
    loss_at: int | None,
) -> None:
    headers = {"Authorization": f"Bearer {firmware.token}"}
    if sink.offset:
        headers["Range"] = f"bytes={sink.offset}-"
    try:
        async with client.stream("GET", firmware.url, headers=headers) as resp:
            _check_status(resp, sink)
            async for chunk in resp.aiter_bytes(CHUNK_SIZE):
                remaining = firmware.size - sink.offset
                if len(chunk) >= remaining and plan.corrupt and remaining > 0:
                    # Injected corruption: flip the last byte of the image.
                    last = remaining - 1
                    chunk = chunk[:last] + bytes([chunk[last] ^ 0xFF]) + chunk[last + 1 :]
                sink.write(chunk)
                on_progress(sink.offset)
                if sink.offset > firmware.size:
                    return  # more bytes than the manifest says: the digest check fails it
                if loss_at is not None and sink.offset >= loss_at and sink.offset < firmware.size:
                    raise _NetworkLoss
                if plan.bandwidth:
                    await asyncio.sleep(len(chunk) / plan.jittered(plan.bandwidth))
    except httpx.TransportError as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc


def _check_status(resp: httpx.Response, sink: ImageSink) -> None:
    code = resp.status_code
    if code == 206:
        match = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
        if match is None or int(match.group(1)) != sink.offset:
            sink.reset()
            raise _Transient(f"unexpected Content-Range {resp.headers.get('content-range')!r}")
        return
    if code == 200:
        if sink.offset:
            sink.reset()  # the server ignored Range: take the whole body again
        return
    if code == 416:
        sink.reset()  # we hold more than the server has: start over
        raise _Transient("HTTP 416")
    if code in (408, 425, 429) or code >= 500:
        raise _Transient(f"HTTP {code}")
    raise DownloadFailed(ErrorCode.DOWNLOAD_ERROR, f"HTTP {code} for firmware URL")
