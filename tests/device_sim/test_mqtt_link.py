"""MqttLink against a real broker: the outbox across a lost connection."""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import pytest

from device_sim.mqtt_link import BrokerAddress, MqttLink
from tests.device_sim.helpers import new_id, run

pytestmark = pytest.mark.integration


def test_outbox_moves_on_after_connection_lost_before_puback(mqtt_broker: Any) -> None:
    """The connection drops while a publish waits for its PUBACK: after the reconnect the outbox
    is sent at once (aiomqtt alone would keep waiting for that PUBACK until its 30 s timeout)."""

    async def scenario() -> None:
        device = new_id("lnk")
        topic = f"test/{device}/out"
        received: list[bytes] = []
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port, identifier=new_id("obs")) as obs:
            await obs.subscribe(topic, qos=1)

            async def pump() -> None:
                async for message in obs.messages:
                    received.append(bytes(message.payload))

            pumping = asyncio.get_running_loop().create_task(pump())
            link = MqttLink(
                device,
                BrokerAddress(mqtt_broker.host, mqtt_broker.port),
                on_message=lambda payload: None,
                info=lambda: b"{}",
            )
            running = asyncio.get_running_loop().create_task(link.run())
            try:
                await asyncio.wait_for(link.wait_connected(), 10)
                conn = link._conn
                assert conn is not None
                link.send(topic, b"first")
                # Cut the connection once the PUBLISH is out and before its PUBACK is handled.
                for _ in range(10_000):
                    if conn._pending_publishes:
                        break
                    await asyncio.sleep(0)
                assert conn._pending_publishes and link.pending == 1
                link.go_offline(0.2)
                link.send(topic, b"second")
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                # The observer may see "second" before the link has handled its PUBACK.
                while (b"second" not in received or link.pending) and loop.time() < deadline:
                    await asyncio.sleep(0.02)
                assert b"second" in received, f"outbox stuck after reconnect: {received}"
                assert link.connects == 2 and link.pending == 0
            finally:
                await link.close()
                await asyncio.wait_for(running, 10)
                pumping.cancel()

    run(scenario())
