"""Publishing task events to containerd (``Events.Forward`` on ``TTRPC_ADDRESS``).

containerd learns that a task exited only from the ``/tasks/exit`` event, so
events must not be lost: they go through a queue, in order, on one ttrpc
connection that is re-made if it breaks, with a bounded number of retries
per event.  Publishing never blocks the Task service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf.message import Message

from capsa.protocols.containerd.services.events.ttrpc.v1 import events_pb2
from capsa.shim.v2.wire import EVENTS_SERVICE, NAMESPACE_METADATA_KEY, event_topic, pack_any, timestamp
from capsa.ttrpc.client import Client
from capsa.ttrpc.errors import TtrpcError

log = logging.getLogger("capsa.shimv2.events")

ATTEMPTS = 5


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self._address = address.removeprefix("unix://")
        self._namespace = namespace
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def publish(self, event: Message) -> None:
        self._queue.put_nowait(event)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until every queued event went out: before the shim exits."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._queue.join()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            with contextlib.suppress(TtrpcError, OSError):
                await self._client.aclose()

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._send(event)
            finally:
                self._queue.task_done()

    async def _send(self, event: Message) -> None:
        request = events_pb2.ForwardRequest(
            envelope=events_pb2.Envelope(
                timestamp=timestamp(time.time_ns()),
                namespace=self._namespace,
                topic=event_topic(event),
                event=pack_any(event),
            )
        )
        for attempt in range(ATTEMPTS):
            try:
                if self._client is None or self._client.closed:
                    self._client = await Client.connect_unix(self._address)
                await self._client.call(
                    EVENTS_SERVICE,
                    "Forward",
                    request.SerializeToString(),
                    timeout=10,
                    metadata={NAMESPACE_METADATA_KEY: self._namespace},
                )
                return
            except (TtrpcError, OSError) as exc:
                log.warning("publishing %s failed (attempt %d): %s", event_topic(event), attempt + 1, exc)
                self._client = None
                await asyncio.sleep(0.2 * (attempt + 1))
        log.error("dropped event %s after %d attempts", event_topic(event), ATTEMPTS)
