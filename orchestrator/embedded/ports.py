"""Free-port picking and port probing on the loopback interface."""

from __future__ import annotations

import contextlib
import socket
import time

LOOPBACK = "127.0.0.1"
_PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


class PortUnavailable(OSError):
    """No TCP port could be bound on the loopback interface."""


def ephemeral_range() -> str:
    """The kernel's ephemeral port range as "low-high" (Linux), else "unknown"."""
    try:
        with open(_PORT_RANGE) as f:
            low, high = f.read().split()
    except (OSError, ValueError):
        return "unknown"
    return f"{low}-{high}"


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return ``count`` distinct TCP ports that were free on ``host`` a moment ago.

    Precondition: ``count >= 1``. The kernel picks them from its ephemeral range, so they never
    collide with system services on their well-known ports. Another process may still grab a
    port before the caller binds it: callers retry their start with fresh ports when that happens.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    sockets: list[socket.socket] = []
    try:
        # Keep every socket open until all are picked so the ports are distinct.
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    except OSError as exc:
        raise PortUnavailable(
            exc.errno,
            f"cannot bind a TCP port on {host} ({exc.strerror or exc}): fleet runs its servers on free "
            f"loopback ports from the kernel's ephemeral range ({ephemeral_range()}); check that the "
            "loopback interface is up and that no sandbox or policy blocks binding ports there",
        ) from exc
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = LOOPBACK) -> int:
    """Return one TCP port that was free on ``host`` a moment ago (see :func:`free_ports`)."""
    return free_ports(1, host)[0]


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port`` within ``timeout`` seconds."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> bool:
    """Poll until ``host:port`` accepts connections; False if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        if port_is_open(host, port, timeout=0.2):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
