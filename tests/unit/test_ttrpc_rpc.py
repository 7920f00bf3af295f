"""The asyncio ttrpc client and server over real connections (socketpairs, unix sockets)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from capsa.protocols import ttrpc_pb2
from capsa.ttrpc import (
    MAX_MESSAGE_SIZE,
    Client,
    Code,
    ConnectionClosed,
    Context,
    Server,
    StatusError,
    unary_method,
)

SERVICE = "test.v1.Echo"
T = TypeVar("T")


def run(scenario: Callable[[], Awaitable[T]], settle: float = 0.0) -> T:
    """Run ``scenario`` with a time bound; then no task it started may be left.

    ``settle``: how long tasks that asyncio itself started (unix server
    connection handlers) get to finish on their own first.
    """

    async def bounded() -> T:
        result = await asyncio.wait_for(scenario(), 5)
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others and settle:
            await asyncio.wait(others, timeout=settle)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return result

    return asyncio.run(bounded())


async def stream_pair() -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter], tuple[asyncio.StreamReader, asyncio.StreamWriter]
]:
    left, right = socket.socketpair()
    return await asyncio.open_connection(sock=left), await asyncio.open_connection(sock=right)


@asynccontextmanager
async def serving(server: Server) -> AsyncIterator[Client]:
    """A client connected to ``server`` over a socketpair; everything closed on exit."""
    (client_reader, client_writer), (server_reader, server_writer) = await stream_pair()
    task = asyncio.create_task(server.serve_connection(server_reader, server_writer))
    client = Client(client_reader, client_writer)
    try:
        yield client
    finally:
        await client.aclose()
        await asyncio.wait_for(task, 2)


def echo_server(**extra: Callable[[bytes, Context], Awaitable[bytes]]) -> Server:
    async def echo(payload: bytes, context: Context) -> bytes:
        return payload

    server = Server()
    server.register_service(SERVICE, {"Echo": echo, **extra})
    return server


def test_call_and_unary_round_trip_with_metadata() -> None:
    seen: list[Context] = []

    async def greet(request: ttrpc_pb2.KeyValue, context: Context) -> ttrpc_pb2.KeyValue:
        seen.append(context)
        return ttrpc_pb2.KeyValue(key=request.key, value=f"hello {request.value}")

    server = echo_server(Greet=unary_method(ttrpc_pb2.KeyValue, greet))

    async def scenario() -> tuple[bytes, ttrpc_pb2.KeyValue]:
        async with serving(server) as client:
            echoed = await client.call(SERVICE, "Echo", b"\x01\x02", metadata={"trace": "abc"})
            reply = await client.unary(SERVICE, "Greet", ttrpc_pb2.KeyValue(key="k", value="you"), ttrpc_pb2.KeyValue)
            return echoed, reply

    echoed, reply = run(scenario)
    assert echoed == b"\x01\x02"
    assert (reply.key, reply.value) == ("k", "hello you")
    [context] = seen
    assert (context.service, context.method, context.stream_id, context.deadline) == (SERVICE, "Greet", 3, None)


def test_concurrent_calls_complete_out_of_order() -> None:
    release_first = asyncio.Event
    order: list[str] = []

    async def scenario() -> list[bytes]:
        gate = release_first()

        async def first(payload: bytes, context: Context) -> bytes:
            await gate.wait()  # finishes only after the second call has been answered
            return b"first"

        async def second(payload: bytes, context: Context) -> bytes:
            return b"second"

        async with serving(echo_server(First=first, Second=second)) as client:

            async def tracked(method: str) -> bytes:
                result = await client.call(SERVICE, method, b"")
                order.append(method)
                if method == "Second":
                    gate.set()
                return result

            return list(await asyncio.gather(tracked("First"), tracked("Second"), tracked("Echo")))

    assert run(scenario) == [b"first", b"second", b""]
    assert order.index("Second") < order.index("First")


def test_many_calls_in_flight_on_one_connection() -> None:
    async def slow_echo(payload: bytes, context: Context) -> bytes:
        await asyncio.sleep(0.001 * (payload[0] % 7))
        return payload

    async def scenario() -> list[bytes]:
        async with serving(echo_server(Slow=slow_echo)) as client:
            return list(await asyncio.gather(*(client.call(SERVICE, "Slow", bytes([i])) for i in range(200))))

    assert run(scenario) == [bytes([i]) for i in range(200)]


def test_handler_errors_map_to_status_codes() -> None:
    async def not_found(payload: bytes, context: Context) -> bytes:
        raise StatusError(Code.NOT_FOUND, "no such container")

    async def crash(payload: bytes, context: Context) -> bytes:
        raise ValueError("boom")

    async def typed(request: ttrpc_pb2.KeyValue, context: Context) -> ttrpc_pb2.KeyValue:
        return request

    server = echo_server(NotFound=not_found, Crash=crash, Typed=unary_method(ttrpc_pb2.KeyValue, typed))

    async def scenario() -> list[tuple[Code, str]]:
        results = []
        async with serving(server) as client:
            for service, method, payload in [
                (SERVICE, "NotFound", b""),
                (SERVICE, "Crash", b""),
                ("nope.Service", "Echo", b""),
                (SERVICE, "Nope", b""),
                (SERVICE, "Typed", b"\x0a\xff"),
            ]:
                with pytest.raises(StatusError) as caught:
                    await client.call(service, method, payload)
                results.append((caught.value.code, caught.value.message))
            # The connection survives every one of them.
            assert await client.call(SERVICE, "Echo", b"ok") == b"ok"
        return results

    results = run(scenario)
    assert results[:4] == [
        (Code.NOT_FOUND, "no such container"),
        (Code.INTERNAL, "boom"),
        (Code.UNIMPLEMENTED, "service nope.Service"),
        (Code.UNIMPLEMENTED, "method Nope"),
    ]
    assert results[4][0] is Code.INVALID_ARGUMENT


def test_timeout_fails_locally_and_the_server_gets_the_deadline() -> None:
    seen: list[Context] = []
    cancelled = asyncio.Event

    async def scenario() -> tuple[StatusError, bool]:
        handler_cancelled = cancelled()

        async def hang(payload: bytes, context: Context) -> bytes:
            seen.append(context)
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                handler_cancelled.set()
                raise
            return b""

        async with serving(echo_server(Hang=hang)) as client:
            started = asyncio.get_running_loop().time()
            with pytest.raises(StatusError) as caught:
                await client.call(SERVICE, "Hang", b"", timeout=0.05)
            assert asyncio.get_running_loop().time() - started < 1
            # The server cancels the handler at the deadline it was sent.
            await asyncio.wait_for(handler_cancelled.wait(), 1)
            # A late reply is dropped; the connection still works.
            assert await client.call(SERVICE, "Echo", b"x", timeout=1) == b"x"
            return caught.value, handler_cancelled.is_set()

    error, was_cancelled = run(scenario)
    assert error.code is Code.DEADLINE_EXCEEDED
    assert was_cancelled
    [context] = seen
    assert context.deadline is not None


def test_peer_closing_mid_call_fails_every_pending_call() -> None:
    async def scenario() -> list[bytes | BaseException]:
        (client_reader, client_writer), (peer_reader, peer_writer) = await stream_pair()
        async with Client(client_reader, client_writer) as client:
            calls = [asyncio.create_task(client.call(SERVICE, "Echo", b"")) for _ in range(3)]
            await peer_reader.readexactly(10)  # a request arrived: now hang up on it
            peer_writer.close()
            await peer_writer.wait_closed()
            results = await asyncio.gather(*calls, return_exceptions=True)
            with pytest.raises(ConnectionClosed):
                await client.call(SERVICE, "Echo", b"")
        return results

    results = run(scenario)
    assert all(isinstance(result, ConnectionClosed) and result.by_peer for result in results)


def test_closing_the_client_fails_pending_calls_as_closed_locally() -> None:
    async def scenario() -> BaseException | bytes:
        (client_reader, client_writer), (peer_reader, peer_writer) = await stream_pair()
        client = Client(client_reader, client_writer)
        call = asyncio.create_task(client.call(SERVICE, "Echo", b""))
        await peer_reader.readexactly(10)
        await client.aclose()
        result = (await asyncio.gather(call, return_exceptions=True))[0]
        peer_writer.close()
        await peer_writer.wait_closed()
        return result

    result = run(scenario)
    assert isinstance(result, ConnectionClosed)
    assert not result.by_peer


def test_server_cancels_handlers_when_the_client_goes_away() -> None:
    async def scenario() -> bool:
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def hang(payload: bytes, context: Context) -> bytes:
            started.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return b""

        (client_reader, client_writer), (server_reader, server_writer) = await stream_pair()
        serve = asyncio.create_task(echo_server(Hang=hang).serve_connection(server_reader, server_writer))
        client = Client(client_reader, client_writer)
        call = asyncio.create_task(client.call(SERVICE, "Hang", b""))
        await started.wait()
        await client.aclose()
        await asyncio.wait_for(serve, 1)  # returns at EOF
        await asyncio.gather(call, return_exceptions=True)
        return cancelled.is_set()

    assert run(scenario)


def read_frame_header(data: bytes) -> tuple[int, int, int, int]:
    length, stream_id, message_type, flags = struct.unpack(">IIBB", data)
    return length, stream_id, message_type, flags


async def read_response(reader: asyncio.StreamReader) -> tuple[int, ttrpc_pb2.Response]:
    length, stream_id, message_type, _ = read_frame_header(await reader.readexactly(10))
    assert message_type == 2
    return stream_id, ttrpc_pb2.Response.FromString(await reader.readexactly(length))


def raw_request(stream_id: int, method: str = "Echo", payload: bytes = b"") -> bytes:
    body = ttrpc_pb2.Request(service=SERVICE, method=method, payload=payload).SerializeToString()
    return struct.pack(">IIBB", len(body), stream_id, 1, 0) + body


def test_server_answers_protocol_violations_on_their_stream() -> None:
    """Oversized, even-id and reused-id frames from a raw peer, then a good request."""

    async def scenario() -> list[tuple[int, int, str]]:
        (peer_reader, peer_writer), (server_reader, server_writer) = await stream_pair()
        serve = asyncio.create_task(echo_server().serve_connection(server_reader, server_writer))
        oversized = MAX_MESSAGE_SIZE + 1
        peer_writer.write(struct.pack(">IIBB", oversized, 1, 1, 0) + b"\0" * oversized)
        peer_writer.write(raw_request(2) + raw_request(3, payload=b"a") + raw_request(3) + bytes(10))
        peer_writer.write(struct.pack(">IIBB", 3, 5, 9, 0) + b"???")  # unknown type: skipped silently
        peer_writer.write(raw_request(7, payload=b"b"))
        answers = []
        for _ in range(6):
            stream_id, response = await read_response(peer_reader)
            answers.append((stream_id, response.status.code, response.status.message or response.payload.decode()))
        peer_writer.close()
        await asyncio.wait_for(serve, 1)
        await peer_writer.wait_closed()
        return answers

    answers = run(scenario)
    assert answers[0] == (
        1,
        Code.RESOURCE_EXHAUSTED,
        f"message length {MAX_MESSAGE_SIZE + 1} exceed maximum message size of {MAX_MESSAGE_SIZE}",
    )
    assert answers[1] == (2, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
    rest = sorted(answers[2:])
    # Stream 3 is answered twice (its reuse is rejected), stream 0 (the zero header) once; 7 echoes.
    assert (0, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams") in rest
    assert (3, Code.OK, "a") in rest
    assert (3, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment") in rest
    assert (7, Code.OK, "b") in rest


def test_messages_over_the_limit_are_refused_with_resource_exhausted() -> None:
    async def huge(payload: bytes, context: Context) -> bytes:
        return b"x" * (MAX_MESSAGE_SIZE + 1)

    async def scenario() -> tuple[StatusError, StatusError]:
        async with serving(echo_server(Huge=huge)) as client:
            with pytest.raises(StatusError) as request_refused:
                await client.call(SERVICE, "Echo", b"x" * MAX_MESSAGE_SIZE)
            with pytest.raises(StatusError) as reply_refused:
                await client.call(SERVICE, "Huge", b"")
            assert await client.call(SERVICE, "Echo", b"still fine") == b"still fine"
            return request_refused.value, reply_refused.value

    request_refused, reply_refused = run(scenario)
    assert request_refused.code is Code.RESOURCE_EXHAUSTED
    assert reply_refused.code is Code.RESOURCE_EXHAUSTED
    assert "exceed maximum message size" in reply_refused.message


def test_serve_unix_and_connect_unix(tmp_path: Path) -> None:
    path = str(tmp_path / "ttrpc.sock")

    async def scenario() -> bytes:
        listener = await echo_server().serve_unix(path)
        async with listener:
            async with await Client.connect_unix(path) as client:
                result = await client.call(SERVICE, "Echo", b"over unix")
            listener.close()
            await listener.wait_closed()
        return result

    # Python 3.11's wait_closed() does not wait for connection handlers;
    # ours must end by itself once it sees the client's EOF.
    assert run(scenario, settle=1.0) == b"over unix"


def test_register_service_twice_is_refused() -> None:
    server = echo_server()
    with pytest.raises(ValueError, match="already registered"):
        server.register_service(SERVICE, {})
