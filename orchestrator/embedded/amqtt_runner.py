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


def _broker_class() -> type[Any]:
    """amqtt's Broker with retained messages sent only where MQTT says they go.

    amqtt 0.12, when a client connects, sends it the retained messages matching *every* client's
    subscriptions (it walks the broker-wide subscription table), and on SUBSCRIBE it sends them
    even when the subscription was refused; neither path asks the topic ACL. A device would so
    receive every other device's desired document. Here a retained message goes to a session only
    for a filter that session holds, and only if the ACL lets it receive that topic.
    """
    from amqtt.broker import Broker
    from amqtt.contexts import Action

    class FleetBroker(Broker):  # type: ignore[misc]
        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            topic_filter, qos = subscription
            holders = self._subscriptions.get(topic_filter, ())
            held = [sub_qos for holder, sub_qos in holders if holder.client_id == session.client_id]
            if not held:
                return
            handler = self._get_handler(session)
            if handler is None:
                return
            granted = min(qos, held[0]) if qos else held[0]
            sends = []
            for topic, retained in list(self._retained_messages.items()):
                if not self._matches(topic, topic_filter):
                    continue
                if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                    continue
                send_qos = min(granted, retained.qos) if retained.qos is not None else granted
                send = handler.mqtt_publish(topic, retained.data, send_qos, retain=True)
                sends.append(asyncio.ensure_future(send))
            if sends:
                await asyncio.wait(sends)

    return FleetBroker


async def serve(config: dict[str, Any]) -> None:
    """Start an amqtt broker with ``config`` and run it until SIGTERM or SIGINT."""
    from .amqtt_plugins import reload_all

    broker = _broker_class()(config)
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
