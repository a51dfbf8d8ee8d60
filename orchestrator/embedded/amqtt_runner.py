"""Run an amqtt broker in this process: ``python -m orchestrator.embedded.amqtt_runner --config FILE``.

FILE is a JSON amqtt broker configuration (see :class:`orchestrator.embedded.mqtt_broker.AmqttBroker`).
SIGTERM / SIGINT stop the broker cleanly; SIGHUP re-reads the password and ACL files of the
plugins in :mod:`orchestrator.embedded.amqtt_plugins`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import warnings
from pathlib import Path
from typing import Any


async def serve(config: dict[str, Any]) -> None:
    """Start an amqtt broker with ``config`` and run it until SIGTERM or SIGINT."""
    from amqtt.broker import Broker

    from .amqtt_plugins import reload_all

    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_all)
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="JSON broker configuration")
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")
    args = parser.parse_args(argv)
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=log_format)
    # amqtt warns about its own deprecated internals on every start; nothing to act on here.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    config = json.loads(args.config.read_text())
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
