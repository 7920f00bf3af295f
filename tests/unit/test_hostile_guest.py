"""A hostile guest on the agent channel: the host side's ttrpc client, agent client and
the proxy's forwarding against a fake guest on a socketpair that sends arbitrary bytes
and valid-but-hostile frames (fuzzed with Hypothesis, bounded to a few seconds).

Whatever the guest sends (docs/architecture.md, "Threat model"):

- every call ends with a value or capsa's own error (``TtrpcError`` from the ttrpc
  client, ``AgentError`` from the agent client), never another exception, and never
  later than its timeout;
- a reply resolves only the call that opened its stream, in whatever order they come;
- host memory stays bounded: at most one frame's payload (4 MiB) is held for an
  unfinished frame, larger frames are skipped unread, a guest that stops reading holds
  at most ``MAX_WRITE_BACKLOG`` of requests, and dropped frames do not write a log line
  each;
- the proxy whose guest misbehaves still serves its own API, and another proxy's
  calls go on as if nothing happened.

The fake guest is a test tool; a real guest's channel is in tests/integration.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsa.errors import AgentError
from capsa.protocols import agent_pb2 as pb
from capsa.protocols import proxy_pb2, ttrpc_pb2
from capsa.proxy.launch import PROXY_SERVICE
from capsa.proxy.service import build_server
from capsa.runtime.agent_client import SERVICE as AGENT_SERVICE
from capsa.runtime.agent_client import AgentClient
from capsa.ttrpc import MAX_MESSAGE_SIZE, Client, Code, ConnectionClosed, Server, StatusError, TtrpcError
from capsa.ttrpc.client import MAX_WRITE_BACKLOG, READ_SIZE
from capsa.ttrpc.codec import Connection, RequestReceived, Role
from capsa.ttrpc.server import Context, unary_method

T = TypeVar("T")
Streams = tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], tuple[asyncio.StreamReader, asyncio.StreamWriter]]

REQUEST, RESPONSE, DATA = 1, 2, 3
TIMEOUT = 0.2  # each call's own timeout
SLACK = 1.0  # what a call may take beyond it on a loaded CI machine


class Records(logging.Handler):
    """The records of the ``capsa.ttrpc`` and ``capsa.proxy`` loggers, at every level, while installed.

    Installed on the loggers themselves: the CLI's tests may have stopped ``capsa``
    from propagating to the root logger, where pytest's caplog listens.
    """

    NAMES = ("capsa.ttrpc", "capsa.proxy")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._levels: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Records:
        for name in self.NAMES:
            logger = logging.getLogger(name)
            self._levels.append(logger.level)
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, level in zip(self.NAMES, self._levels, strict=True):
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            logger.setLevel(level)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]


def run(scenario: Callable[[], Awaitable[T]], bound: float = 20) -> T:
    """Run ``scenario`` under a hard time bound; no task it started may be left."""

    async def bounded() -> T:
        result = await asyncio.wait_for(scenario(), bound)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return result

    return asyncio.run(bounded())


async def socket_pair() -> Streams:
    host, guest = socket.socketpair()
    return await asyncio.open_connection(sock=host), await asyncio.open_connection(sock=guest)


def frame(stream_id: int, message_type: int, payload: bytes, flags: int = 0, length: int | None = None) -> bytes:
    """A frame as the guest may write it: any header (the length need not match), then ``payload``."""
    return struct.pack(">IIBB", len(payload) if length is None else length, stream_id, message_type, flags) + payload


def reply(stream_id: int, payload: bytes = b"", code: int = 0, message: str = "") -> bytes:
    body = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=code, message=message), payload=payload)
    return frame(stream_id, RESPONSE, body.SerializeToString())


# A response whose frame is exactly at the limit: containerd's largest legal message.
_AT_LIMIT_ENVELOPE = len(ttrpc_pb2.Response(payload=b"x" * (MAX_MESSAGE_SIZE - 16)).SerializeToString()) - (
    MAX_MESSAGE_SIZE - 16
)
AT_LIMIT_PAYLOAD = b"L" * (MAX_MESSAGE_SIZE - _AT_LIMIT_ENVELOPE)
AT_LIMIT_BODY = ttrpc_pb2.Response(payload=AT_LIMIT_PAYLOAD).SerializeToString()  # no status: OK
assert len(AT_LIMIT_BODY) == MAX_MESSAGE_SIZE


async def requests_seen(reader: asyncio.StreamReader, count: int) -> list[int]:
    """The guest's view: the stream ids of the first ``count`` requests the host sent."""
    connection = Connection(Role.SERVER)
    ids: list[int] = []
    while len(ids) < count:
        data = await reader.read(READ_SIZE)
        if not data:
            break
        ids += [event.stream_id for event in connection.receive_data(data) if isinstance(event, RequestReceived)]
    return ids


# ------------------------------------------------------------------ the fuzzed guest
#
# A script is a list of actions; each renders to bytes given the ids of the streams
# the host opened (an index picks one, modulo their number).  "Whole" actions keep the
# framing intact, so the test can tell what each call must end with; the others
# (raw bytes, a header over the limit, an unfinished frame) break it on purpose.


@dataclass(frozen=True)
class Action:
    kind: str
    pick: int = 0
    stream_id: int = 0
    message_type: int = 0
    flags: int = 0
    code: int = 0
    message: str = ""
    body: bytes = b""
    length: int = 0

    @property
    def whole(self) -> bool:
        return self.kind not in {"raw", "oversized", "unfinished"}

    def target(self, ids: list[int]) -> int:
        return ids[self.pick % len(ids)] if ids else 1

    def render(self, ids: list[int]) -> bytes:
        if self.kind == "raw":
            return self.body
        if self.kind == "reply":
            return reply(self.target(ids), self.body, self.code, self.message)
        if self.kind == "reply-bytes":  # a response body that may not decode
            return frame(self.target(ids), RESPONSE, self.body)
        if self.kind == "at-limit":
            return frame(self.target(ids), RESPONSE, AT_LIMIT_BODY)
        if self.kind == "data":
            return frame(self.target(ids), DATA, self.body, self.flags)
        if self.kind in {"stray", "unknown", "request"}:
            return frame(self.stream_id, self.message_type, self.body, self.flags)
        if self.kind == "oversized":  # header only, and a little of the announced payload
            return frame(self.target(ids), self.message_type, self.body, length=self.length)
        if self.kind == "unfinished":  # a frame that never ends (under the limit)
            return frame(self.target(ids), RESPONSE, self.body, length=len(self.body) + self.length)
        raise AssertionError(self.kind)


picks = st.integers(0, 7)
bodies = st.binary(max_size=48)
never_opened = st.integers(0, (1 << 31) - 1).map(lambda n: 2 * n)  # the host opens odd ids only
actions = st.one_of(
    st.builds(Action, kind=st.just("raw"), body=st.binary(max_size=64)),
    st.builds(
        Action,
        kind=st.just("reply"),
        pick=picks,
        code=st.sampled_from([0, 0, 0, 5, 13, -1, 99, (1 << 31) - 1]),
        message=st.text(max_size=16),
        body=bodies,
    ),
    st.builds(Action, kind=st.just("reply-bytes"), pick=picks, body=bodies),
    st.builds(Action, kind=st.just("data"), pick=picks, flags=st.integers(0, 255), body=bodies),
    st.builds(Action, kind=st.just("stray"), stream_id=never_opened, message_type=st.just(RESPONSE), body=bodies),
    st.builds(
        Action, kind=st.just("unknown"), stream_id=picks, message_type=st.integers(4, 255), flags=st.integers(0, 255)
    ),
    st.builds(Action, kind=st.just("request"), stream_id=st.integers(0, 9), message_type=st.just(REQUEST), body=bodies),
    st.builds(
        Action,
        kind=st.just("oversized"),
        pick=picks,
        message_type=st.integers(0, 255),
        length=st.integers(MAX_MESSAGE_SIZE + 1, (1 << 32) - 1),
        body=bodies,
    ),
    st.builds(Action, kind=st.just("unfinished"), pick=picks, length=st.integers(1, MAX_MESSAGE_SIZE), body=bodies),
    st.builds(Action, kind=st.just("at-limit"), pick=picks),
)
scripts = st.lists(actions, max_size=10)
endings = st.sampled_from(["eof", "eof", "eof", "silent"])  # close the channel, or answer no more


def expected_outcomes(script: list[Action], ids: list[int], ending: str) -> dict[int, object]:
    """For a script of whole frames: what each call must end with (bytes, or (code, message))."""
    outcome: dict[int, object] = {}
    for action in script:
        stream = action.target(ids)
        if stream in outcome or action.kind not in {"reply", "reply-bytes", "at-limit", "data"}:
            continue
        if action.kind == "reply":
            outcome[stream] = action.body if action.code == 0 else (Code.from_wire(action.code), action.message)
        elif action.kind == "at-limit":
            outcome[stream] = AT_LIMIT_PAYLOAD
        elif action.kind == "reply-bytes":
            try:
                response = ttrpc_pb2.Response.FromString(action.body)
            except Exception:
                outcome[stream] = (Code.INTERNAL, None)
            else:
                code = response.status.code
                outcome[stream] = response.payload if code == 0 else (Code.from_wire(code), response.status.message)
        elif action.flags & 0x1:
            # The guest closed its side of a unary call with data: no response may follow.
            outcome[stream] = "unanswered"
    for stream in ids:
        if outcome.get(stream, "unanswered") == "unanswered":
            outcome[stream] = (Code.DEADLINE_EXCEEDED, None) if ending == "silent" else ConnectionClosed
    return outcome


def check_outcome(result: object, wanted: object) -> None:
    if isinstance(wanted, bytes):
        assert result == wanted
    elif wanted is ConnectionClosed:
        assert isinstance(result, ConnectionClosed) and result.by_peer
    else:
        code, message = cast(tuple[Code, str | None], wanted)
        assert isinstance(result, StatusError), result
        assert result.code == code
        if message is not None:
            assert result.message == message


async def play(script: list[Action], ids: list[int], writer: asyncio.StreamWriter, ending: str) -> None:
    for action in script:
        writer.write(action.render(ids))
    await writer.drain()
    if ending == "eof":
        writer.close()


async def outcome_of(call: Awaitable[T]) -> tuple[T | BaseException, float]:
    started = time.monotonic()
    try:
        return await call, time.monotonic() - started
    except Exception as exc:
        return exc, time.monotonic() - started


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=scripts, calls=st.integers(1, 3), ending=endings)
def test_fuzz_the_ttrpc_client_against_a_hostile_guest(script: list[Action], calls: int, ending: str) -> None:
    async def scenario() -> None:
        (host_reader, host_writer), (guest_reader, guest_writer) = await socket_pair()
        client = Client(host_reader, host_writer)
        pending = [
            asyncio.create_task(outcome_of(client.call(AGENT_SERVICE, "Check", b"", timeout=TIMEOUT)))
            for _ in range(calls)
        ]
        ids = await requests_seen(guest_reader, calls)
        await play(script, ids, guest_writer, ending)
        results = await asyncio.gather(*pending)
        for result, elapsed in results:
            assert isinstance(result, bytes | TtrpcError), repr(result)
            assert elapsed < TIMEOUT + SLACK
        if all(action.whole for action in script):
            wanted = expected_outcomes(script, ids, ending)
            for stream, (result, _) in zip(ids, results, strict=True):
                check_outcome(result, wanted[stream])
        await client.aclose()  # re-raises whatever else stopped its reader: nothing may have
        guest_writer.close()

    run(scenario)


# ------------------------------------------------------------------ the agent client


agent_replies = st.one_of(
    st.binary(max_size=48),
    st.builds(
        lambda n, s: pb.StatsContainerResponse(cpu_usage_usec=n, memory_limit_bytes=n, oom_kills=s).SerializeToString(),
        st.integers(0, (1 << 64) - 1),
        st.integers(0, (1 << 64) - 1),
    ),
    st.sampled_from([b"\x0a\x02\xff\xfe", b"\x0a\xff\xff\xff\xff\x0f", b"\x08\x02", b"\x18\x01"]),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies=st.lists(st.tuples(picks, agent_replies), max_size=6), garbage=st.binary(max_size=32), ending=endings)
def test_fuzz_the_agent_client_sees_only_agent_errors(
    replies: list[tuple[int, bytes]], garbage: bytes, ending: str
) -> None:
    async def scenario() -> None:
        (host_reader, host_writer), (guest_reader, guest_writer) = await socket_pair()
        agent = AgentClient(Client(host_reader, host_writer), request_timeout=TIMEOUT)
        calls: list[Awaitable[object]] = [
            agent.check(TIMEOUT),
            agent.stats_container("web"),
            agent.list_processes("web"),
            agent.wait_oom_kill("web", 0, TIMEOUT),
            agent.update_routes(pb.Routes()),
        ]
        pending = [asyncio.create_task(outcome_of(call)) for call in calls]
        ids = await requests_seen(guest_reader, len(calls))
        for pick, payload in replies:
            guest_writer.write(reply(ids[pick % len(ids)], payload))
        guest_writer.write(garbage)
        await guest_writer.drain()
        if ending == "eof":
            guest_writer.close()
        for result, elapsed in await asyncio.gather(*pending):
            assert not isinstance(result, BaseException) or isinstance(result, AgentError), repr(result)
            assert elapsed < TIMEOUT + SLACK
        await agent.aclose()
        guest_writer.close()

    run(scenario)


# ------------------------------------------------------------------ the proxy


def proxy_over(agent: Client) -> Server:
    """The proxy's real server (``build_server``) on an agent connection; its own API answers Info."""
    proxy = SimpleNamespace(agent_connection=lambda: agent, info=lambda: proxy_pb2.InfoResponse(proxy_pid=4242))
    return build_server(cast(Any, proxy))


@dataclass
class RunningProxy:
    """A proxy whose agent connection leads to ``guest``, and a host client of it."""

    host: Client
    guest_reader: asyncio.StreamReader
    guest_writer: asyncio.StreamWriter
    agent: Client
    serving: asyncio.Task[None]

    @classmethod
    async def start(cls) -> RunningProxy:
        (agent_reader, agent_writer), (guest_reader, guest_writer) = await socket_pair()
        agent = Client(agent_reader, agent_writer)
        (host_reader, host_writer), (proxy_reader, proxy_writer) = await socket_pair()
        serving = asyncio.create_task(proxy_over(agent).serve_connection(proxy_reader, proxy_writer))
        return cls(Client(host_reader, host_writer), guest_reader, guest_writer, agent, serving)

    async def info(self) -> int:
        reply = await self.host.unary(PROXY_SERVICE, "Info", proxy_pb2.InfoRequest(), proxy_pb2.InfoResponse, timeout=5)
        return reply.proxy_pid

    async def close(self) -> None:
        await self.host.aclose()
        await asyncio.wait_for(self.serving, 5)  # the server ends with its client, whatever the guest did
        await self.agent.aclose()
        self.guest_writer.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=scripts, ending=endings)
def test_fuzz_the_proxy_forwards_only_statuses_and_keeps_serving(script: list[Action], ending: str) -> None:
    async def scenario() -> None:
        proxy = await RunningProxy.start()
        methods = ["StatsContainer", "WaitProcess"]
        pending = [
            asyncio.create_task(outcome_of(proxy.host.call(AGENT_SERVICE, method, b"", timeout=TIMEOUT)))
            for method in methods
        ]
        ids = await requests_seen(proxy.guest_reader, len(methods))
        await play(script, ids, proxy.guest_writer, ending)
        for result, elapsed in await asyncio.gather(*pending):
            # The host client sees the guest's payload or a status, never the proxy's failure.
            assert isinstance(result, bytes | StatusError), repr(result)
            assert elapsed < TIMEOUT + SLACK
        assert await proxy.info() == 4242  # the proxy's own API is untouched
        if ending == "eof":
            result, _ = await outcome_of(proxy.host.call(AGENT_SERVICE, "Check", b"", timeout=TIMEOUT))
            assert isinstance(result, StatusError) and result.code == Code.UNAVAILABLE
        await proxy.close()

    with Records() as log:
        run(scenario)
    # A forwarder that failed would have been answered INTERNAL and logged as an error.
    assert log.errors() == []


def test_a_reply_at_the_limit_passes_and_one_that_the_proxy_cannot_rewrap_is_refused() -> None:
    async def scenario() -> None:
        proxy = await RunningProxy.start()
        first = asyncio.create_task(proxy.host.call(AGENT_SERVICE, "ReadStdout", b"", timeout=10))
        second = asyncio.create_task(proxy.host.call(AGENT_SERVICE, "ReadStdout", b"", timeout=10))
        one, two = await requests_seen(proxy.guest_reader, 2)
        # At the limit with an empty status (2 bytes), as containerd sends it: the proxy
        # re-sends the same bytes to its client.
        proxy.guest_writer.write(reply(one, AT_LIMIT_PAYLOAD[2:]))
        # At the limit with no status at all: re-wrapped with one it would be 2 bytes over.
        proxy.guest_writer.write(frame(two, RESPONSE, AT_LIMIT_BODY))
        assert await first == AT_LIMIT_PAYLOAD[2:]
        with pytest.raises(StatusError) as refused:
            await second
        assert refused.value.code == Code.RESOURCE_EXHAUSTED
        # Over the limit from the guest: skipped unread, that call fails, the channel goes on.
        third = asyncio.create_task(proxy.host.call(AGENT_SERVICE, "ReadStdout", b"", timeout=10))
        fourth = asyncio.create_task(proxy.host.call(AGENT_SERVICE, "Check", b"", timeout=10))
        three, four = await requests_seen(proxy.guest_reader, 2)
        proxy.guest_writer.write(frame(three, RESPONSE, b"\0" * (MAX_MESSAGE_SIZE + 1)) + reply(four, b"ok"))
        with pytest.raises(StatusError) as oversized:
            await third
        assert oversized.value.code == Code.RESOURCE_EXHAUSTED
        assert await fourth == b"ok"
        await proxy.close()

    run(scenario)


def test_replies_out_of_order_and_to_streams_never_opened_reach_only_their_own_calls() -> None:
    async def scenario() -> None:
        (host_reader, host_writer), (guest_reader, guest_writer) = await socket_pair()
        client = Client(host_reader, host_writer)
        calls = [asyncio.create_task(client.call(AGENT_SERVICE, "Check", b"", timeout=5)) for _ in range(3)]
        one, three, five = await requests_seen(guest_reader, 3)
        guest_writer.write(
            reply(five, b"c")
            + reply(7, b"never opened")
            + reply(2, b"even: the host's own parity")
            + frame(one, DATA, b"data on a unary call")
            + reply(one, b"a")
            + reply(one, b"a second answer")
            + reply(three, b"b")
        )
        assert await asyncio.gather(*calls) == [b"a", b"b", b"c"]
        # Answers that come after a call gave up (its timeout) are dropped too.
        late = await outcome_of(client.call(AGENT_SERVICE, "Check", b"", timeout=0.05))
        assert isinstance(late[0], StatusError) and late[0].code == Code.DEADLINE_EXCEEDED
        (gave_up,) = await requests_seen(guest_reader, 1)
        waiting = asyncio.create_task(client.call(AGENT_SERVICE, "Check", b"", timeout=5))
        (waits,) = await requests_seen(guest_reader, 1)
        guest_writer.write(reply(gave_up, b"too late") + reply(waits, b"on time"))
        assert await waiting == b"on time"
        await client.aclose()
        guest_writer.close()

    run(scenario)


# ------------------------------------------------------------------ bounded host memory


async def flood(writer: asyncio.StreamWriter, chunks: list[bytes], rounds: int) -> None:
    """Write ``chunks``, ``rounds`` times over, waiting for the reader after each."""
    for _ in range(rounds):
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()


def traced() -> int:
    return tracemalloc.get_traced_memory()[0]


def peak_while(scenario: Callable[[], Awaitable[None]]) -> int:
    """The most Python memory ``scenario`` held at once (tracemalloc), beyond what it started with."""
    tracemalloc.start()
    try:
        base = traced()
        tracemalloc.reset_peak()
        run(scenario, bound=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - base


# Made before any measurement: what the guest sends is not what the host holds.
ZEROS = [bytes(READ_SIZE)]
_STRAY = frame(10, RESPONSE, AT_LIMIT_PAYLOAD[: MAX_MESSAGE_SIZE - 3 * READ_SIZE])  # 4 MiB, for a stream never opened
STRAY_CHUNKS = [_STRAY[i : i + READ_SIZE] for i in range(0, len(_STRAY), READ_SIZE)]
FLOOD = 12  # 4 MiB each: 48 MiB


@pytest.mark.parametrize("kind", ["over the limit", "at the limit, endlessly", "at the limit, never finished"])
def test_what_a_guest_sends_costs_at_most_one_frame(kind: str) -> None:
    """48 MiB from the guest: a header announcing 4 GiB and then the bytes (skipped as they
    come), endless 4 MiB frames on a stream nobody opened (one held at a time), or one 4 MiB
    frame that never ends (held until the connection does)."""

    async def scenario() -> None:
        (host_reader, host_writer), (guest_reader, guest_writer) = await socket_pair()
        client = Client(host_reader, host_writer)
        call = asyncio.create_task(outcome_of(client.call(AGENT_SERVICE, "Check", b"", timeout=30)))
        (stream,) = await requests_seen(guest_reader, 1)
        if kind == "over the limit":
            guest_writer.write(frame(8, RESPONSE, b"", length=(1 << 32) - 1))
            await flood(guest_writer, ZEROS, FLOOD * MAX_MESSAGE_SIZE // READ_SIZE)
        elif kind == "at the limit, endlessly":
            await flood(guest_writer, STRAY_CHUNKS, FLOOD)
            guest_writer.write(reply(stream, b"still answers"))
            assert (await call)[0] == b"still answers"
        else:
            guest_writer.write(frame(stream, RESPONSE, b"", length=MAX_MESSAGE_SIZE))
            await flood(guest_writer, ZEROS, MAX_MESSAGE_SIZE // READ_SIZE - 1)
        guest_writer.close()  # the rest of the frame never comes: the call fails, the buffer goes
        result, _ = await call
        assert isinstance(result, bytes | ConnectionClosed)
        await client.aclose()

    peak = peak_while(scenario)
    # One frame in the codec's buffer, and its payload while it is handled.
    assert peak < 2 * MAX_MESSAGE_SIZE + (4 << 20), f"{peak / 2**20:.1f} MiB held"


def test_a_guest_that_stops_reading_holds_a_bounded_backlog() -> None:
    """Sixty 1 MiB requests to a guest that reads none: without a bound every one would wait
    in the transport's buffer for the connection's whole life; with it, the calls beyond
    ``MAX_WRITE_BACKLOG`` fail at once and what stays held is that much."""
    held_after: list[int] = []

    async def scenario() -> None:
        base = traced()
        (host_reader, host_writer), (guest_reader, guest_writer) = await socket_pair()
        client = Client(host_reader, host_writer)
        payload = b"p" * (1 << 20)
        results = await asyncio.gather(
            *(outcome_of(client.call(AGENT_SERVICE, "WriteStdin", payload, timeout=0.5)) for _ in range(60))
        )
        codes = [result.code for result, _ in results if isinstance(result, StatusError)]
        assert len(codes) == 60
        assert set(codes) == {Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED}
        assert host_writer.transport.get_write_buffer_size() <= MAX_WRITE_BACKLOG
        # The errors' tracebacks hold each call's frame, and the loop's handle that
        # resumed us holds the results until our next step.
        del results, payload
        await asyncio.sleep(0)
        gc.collect()
        held_after.append(traced() - base)
        # Once the guest reads again, the connection serves: the bound refuses nothing then.
        server = Server()

        async def check(request: pb.CheckRequest, context: Context) -> pb.CheckResponse:
            return pb.CheckResponse(status=pb.CheckResponse.SERVING)

        server.register_service(AGENT_SERVICE, {"Check": unary_method(pb.CheckRequest, check)})
        serving = asyncio.create_task(server.serve_connection(guest_reader, guest_writer))
        await AgentClient(client, 5).check(5)
        await client.aclose()
        await asyncio.wait_for(serving, 5)

    peak_while(scenario)
    assert held_after[0] < MAX_WRITE_BACKLOG + (4 << 20), f"{held_after[0] / 2**20:.1f} MiB held"


def test_closing_the_connection_to_a_guest_that_stops_reading_does_not_wait_for_it() -> None:
    async def scenario() -> None:
        (host_reader, host_writer), (_, guest_writer) = await socket_pair()
        client = Client(host_reader, host_writer)
        result, _ = await outcome_of(client.call(AGENT_SERVICE, "WriteStdin", b"p" * (2 << 20), timeout=0.1))
        assert isinstance(result, StatusError) and result.code == Code.DEADLINE_EXCEEDED
        assert host_writer.transport.get_write_buffer_size() > 0  # the guest took only part of it
        await asyncio.wait_for(client.aclose(), 2)  # the proxy's shutdown must not hang on its guest
        guest_writer.close()

    run(scenario)


def test_a_flood_of_dropped_frames_writes_a_bounded_log() -> None:
    async def scenario() -> None:
        (host_reader, host_writer), (guest_reader, guest_writer) = await socket_pair()
        client = Client(host_reader, host_writer)
        call = asyncio.create_task(client.call(AGENT_SERVICE, "Check", b"", timeout=30))
        (stream,) = await requests_seen(guest_reader, 1)
        # Three kinds of frame nobody can use: an unknown type, a response on a stream
        # never opened, data on a unary call.
        junk = (frame(1, 9, b"") + frame(4, RESPONSE, b"x") + frame(stream, DATA, b"y")) * 20_000
        guest_writer.write(junk + reply(stream, b"done"))
        assert await call == b"done"
        await client.aclose()
        guest_writer.close()

    with Records() as log:
        run(scenario)
    lines = [r.getMessage() for r in log.records if r.name.startswith("capsa.ttrpc")]
    # 60 000 frames: a line for the 1st, 2nd, 4th ... 16384th of each kind.
    assert len(lines) == 3 * 15, lines
    assert sum("(16384 such frames" in line for line in lines) == 3


# ------------------------------------------------------------------ two proxies

_SMALL_GARBAGE = (
    frame(1, 77, b"z" * 100)  # unknown type
    + frame(2, RESPONSE, b"\xff" * 50)  # a stream never opened
    + frame(3, DATA, b"d", flags=0x1)  # data closing a unary call
    + frame(0, REQUEST, b"\x0a\x01")  # a request to the host
) * 100
# Over the limit, with all of its announced bytes: skipped as they come.
_OVERSIZED = frame(5, RESPONSE, b"", length=MAX_MESSAGE_SIZE + 1) + b"\0" * (MAX_MESSAGE_SIZE + 1)


def test_a_hostile_guest_does_not_touch_another_proxy() -> None:
    """Two proxies in one process and one event loop (in production each is a process of
    its own, the shim v2 one per pod): one's guest floods garbage and answers every call
    with bytes that do not decode, the other's is a well-behaved agent.  The good proxy's
    calls stay quick; the bad one's fail with an error within their timeout; both keep
    serving their own API; the flood costs the log a few lines."""

    async def scenario() -> None:
        bad, good = await RunningProxy.start(), await RunningProxy.start()
        agent = Server()

        async def check(request: pb.CheckRequest, context: Context) -> pb.CheckResponse:
            return pb.CheckResponse(status=pb.CheckResponse.SERVING)

        agent.register_service(AGENT_SERVICE, {"Check": unary_method(pb.CheckRequest, check)})
        good_agent = asyncio.create_task(agent.serve_connection(good.guest_reader, good.guest_writer))

        async def answer_with_garbage() -> None:
            connection = Connection(Role.SERVER)
            while data := await bad.guest_reader.read(READ_SIZE):
                for event in connection.receive_data(data):
                    if isinstance(event, RequestReceived):
                        bad.guest_writer.write(reply(event.stream_id, b"\xff\xff not a CheckResponse"))

        stop = asyncio.Event()
        flooded = 0

        async def flood_garbage() -> None:
            nonlocal flooded
            rounds = 0
            while not stop.is_set():
                rounds += 1
                garbage = _OVERSIZED if rounds % 10 == 0 else _SMALL_GARBAGE
                bad.guest_writer.write(garbage)
                await bad.guest_writer.drain()
                flooded += len(garbage)
                await asyncio.sleep(0)
            bad.guest_writer.close()

        answering = asyncio.create_task(answer_with_garbage())
        flooding = asyncio.create_task(flood_garbage())
        good_agent_client, bad_agent_client = AgentClient(good.host, 5), AgentClient(bad.host, TIMEOUT)
        slowest = 0.0
        for _ in range(50):
            started = time.monotonic()
            await good_agent_client.check(5)
            slowest = max(slowest, time.monotonic() - started)
            result, elapsed = await outcome_of(bad_agent_client.check(TIMEOUT))
            assert isinstance(result, AgentError) and elapsed < TIMEOUT + SLACK, result
        assert slowest < 1.0, f"the good proxy's slowest call took {slowest:.2f} s"
        assert flooded > 4 * MAX_MESSAGE_SIZE  # meanwhile the bad guest sent many MiB of garbage
        assert await bad.info() == 4242 and await good.info() == 4242
        stop.set()
        await flooding
        await answering
        # The bad guest is gone: its proxy says so at once, the good one goes on.
        result, elapsed = await outcome_of(bad_agent_client.check(5))
        assert isinstance(result, AgentError) and "gone" in str(result) and elapsed < SLACK
        await good_agent_client.check(5)
        for proxy in (bad, good):
            await proxy.close()
        await asyncio.wait_for(good_agent, 5)

    with Records() as log:
        run(scenario, bound=60)
    assert log.errors() == []
    assert len([r for r in log.records if r.name.startswith("capsa.ttrpc")]) < 100
