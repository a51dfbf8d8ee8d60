"""CPU profiles of running stack processes with py-spy, summarised as top functions per process.

``ProfileSession`` attaches ``py-spy record --format raw`` (collapsed stacks, idle threads left
out) to each named process tree for a fixed time; ``summarize`` turns a collapsed-stack file into
the functions with the most samples on top of the stack ("self") and anywhere in it ("total").
A profiled run is slower than an unprofiled one: use it to see where time goes, not for figures.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter or on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class ProfileSession:
    """One ``py-spy record`` per process tree; ``stop`` waits for them and returns the files."""

    def __init__(self, out_dir: Path, duration_s: int, rate: int = 50) -> None:
        self.out_dir = out_dir
        self.duration_s = duration_s
        self.rate = rate
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def attach(self, name: str, pid: int) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy not found: pip install py-spy")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"{name}.collapsed"
        argv = [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(self.duration_s),
            "--rate",
            str(self.rate),
        ]
        # --subprocesses: a Celery worker's pool processes are its children.
        argv += ["--format", "raw", "--subprocesses", "--nonblocking", "--output", str(out)]
        log = (self.out_dir / f"{name}.py-spy.log").open("wb")
        self.procs[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), out)

    def stop(self, timeout: float = 60.0) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for name, (proc, out) in self.procs.items():
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(10)
            if out.exists():
                files[name] = out
        return files


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def summarize(path: Path, top: int = 12) -> dict[str, Any]:
    """Top functions of a collapsed-stack file: share of samples on top of the stack ("self") and
    anywhere in it ("total"); stacks are grouped by their process (py-spy's first frame)."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f.strip()]
        # py-spy's first frames name the process and thread, not code.
        code = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not code:
            continue
        samples += count
        self_counts[code[-1]] += count
        for frame in set(code):
            total_counts[frame] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "share": round(n / samples, 3)} for f, n in counter.most_common(top)]

    return {"samples": samples, "self": share(self_counts), "total": share(total_counts)}
