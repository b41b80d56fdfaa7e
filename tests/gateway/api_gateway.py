"""The northbound half of a gateway, made of the real parts (Outbox, Publisher,
CommandAuthenticator, payload builders), running on its own event loop in a thread so that
synchronous paho peers can talk to it.

It publishes what a test queues, and answers every command on the site's command topics
the way the API promises: an ack with the reason, on the sender's MQTT 5 response topic
with its correlation data when given, otherwise on <site>/ack. Without the site model it
applies an accepted limit as sent.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from gateway.north import payloads, topics
from gateway.north.auth import CommandAuthenticator, Decision, KeyStore
from gateway.north.outbox import MessageKind, Outbox
from gateway.north.publisher import InboundMessage, Publisher
from gateway.north.settings import MqttSettings, OutboxSettings, TlsSettings

T = TypeVar("T")
KIND_OF = {topics.TopicKind.SITE_TELEMETRY: MessageKind.TELEMETRY,
           topics.TopicKind.COLUMN_TELEMETRY: MessageKind.TELEMETRY,
           topics.TopicKind.COLUMN_STATUS: MessageKind.STATUS,
           topics.TopicKind.SITE_EVENTS: MessageKind.EVENT,
           topics.TopicKind.COLUMN_EVENTS: MessageKind.EVENT,
           topics.TopicKind.ACK: MessageKind.ACK}


def mqtt_settings(workdir: Path, *, port: int, client_id: str, username: str | None = None,
                  password: str | None = None, tls: TlsSettings | None = None) -> MqttSettings:
    workdir.mkdir(parents=True, exist_ok=True)
    password_file = None
    if password is not None:
        password_file = workdir / "mqtt-password"
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
    return MqttSettings(host="127.0.0.1", port=port, client_id=client_id,
                        outbox=OutboxSettings(path=workdir / "outbox.sqlite3", durability="normal"),
                        username=username, password_file=password_file, tls=tls,
                        reconnect_min_s=0.05, reconnect_max_s=0.3, connect_timeout_s=3.0)


class GatewayNorth:
    """start() ... stop(); every method is safe to call from the test's thread."""

    def __init__(self, settings: MqttSettings, *, site_id: str, keys: KeyStore) -> None:
        self.settings = settings
        self.site_id = site_id
        self.keys = keys
        self.decisions: list[Decision] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.outbox: Outbox | None = None
        self.publisher: Publisher | None = None

    # -- lifetime ---------------------------------------------------------------------------
    def start(self) -> GatewayNorth:
        self._thread = threading.Thread(target=self._run, name=f"gateway-{self.site_id}", daemon=True)
        self._thread.start()
        assert self._ready.wait(5), "gateway loop did not start"
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by start()/stop()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ob = self.settings.outbox
        self.outbox = Outbox(ob.path, durability=ob.durability)
        self.authenticator = CommandAuthenticator(self.keys, site_id=self.site_id)
        self.publisher = Publisher(self.settings, self.outbox, site_id=self.site_id,
                                   subscriptions=topics.gateway_subscriptions(self.site_id),
                                   on_message=self._on_command)
        try:
            async with self.publisher:
                self._ready.set()
                await self._stop.wait()
        finally:
            self.outbox.close()

    def stop(self) -> None:
        """Stop cleanly (the Publisher says offline); a second call does nothing."""
        if self._thread is not None and self._thread.is_alive() and self._loop is not None \
                and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
            assert not self._thread.is_alive(), "gateway loop did not stop"
        if self._error is not None:
            raise self._error

    def __enter__(self) -> GatewayNorth:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- calls into the loop ----------------------------------------------------------------
    def call(self, fn: Callable[[], T], timeout_s: float = 5.0) -> T:
        assert self._loop is not None
        fut: Future[T] = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)
        self._loop.call_soon_threadsafe(run)
        return fut.result(timeout_s)

    def publish(self, topic: str, payload: Mapping[str, Any]) -> int:
        """Queue a message the way the service does; returns its seq."""
        kind = topics.parse(topic).kind
        retain = topics.parse(topic).retained
        assert self.outbox is not None
        outbox = self.outbox
        return self.call(lambda: outbox.enqueue(topic, payload, kind=KIND_OF[kind], retain=retain))

    def drained(self, timeout_s: float = 5.0) -> bool:
        assert self._loop is not None and self.publisher is not None
        return asyncio.run_coroutine_threadsafe(self.publisher.drained(timeout_s),
                                                self._loop).result(timeout_s + 1)

    @property
    def connected(self) -> bool:
        assert self.publisher is not None
        publisher = self.publisher
        return self.call(lambda: publisher.connected)

    # -- commands (on the loop) -------------------------------------------------------------
    def _on_command(self, message: InboundMessage) -> None:
        decision = self.authenticator.check(message.topic, message.payload)
        self.decisions.append(decision)
        applied = decision.command.limit_a if decision.accepted and decision.command else None
        ack = payloads.ack(command_id=decision.command_id, reason=decision.reason, applied_limit_a=applied,
                           ts_ms=payloads.utc_ms(), detail=decision.detail)
        reply_to = topics.ack(self.site_id)
        correlation = None
        if self.settings.protocol == "5" and topics.valid_response_topic(message.response_topic):
            reply_to = str(message.response_topic)
            correlation = message.correlation_data
        assert self.outbox is not None
        self.outbox.enqueue(reply_to, ack, kind=MessageKind.ACK, correlation=correlation)
