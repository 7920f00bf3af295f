"""The sans-IO ttrpc codec against hand-built frames (containerd/ttrpc wire format).

Frame header (channel.go): u32 BE payload length, u32 BE stream id, u8 type,
u8 flags.  Expected bytes below are written out by hand from that layout and
the protobuf encoding of ttrpc.Request / ttrpc.Response, not produced by the
code under test.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsa.ttrpc.codec import (
    MAX_MESSAGE_SIZE,
    Connection,
    DataReceived,
    Event,
    Flags,
    InvalidFrameReceived,
    MessageType,
    OversizedFrame,
    PeerClosed,
    RequestReceived,
    ResponseReceived,
    Role,
    StrayFrameReceived,
    UnknownFrameReceived,
)
from capsa.ttrpc.errors import Code, LocalProtocolError, MessageTooLarge, RemoteProtocolError

# ttrpc.Request{service: "svc", method: "M", payload: 08 01, timeout_nano: 1e9, metadata: [{k: v}]}
REQUEST_PAYLOAD = b"".join(
    [
        bytes([0x0A, 0x03, *b"svc"]),  # field 1 (service), length-delimited
        bytes([0x12, 0x01, *b"M"]),  # field 2 (method)
        bytes([0x1A, 0x02, 0x08, 0x01]),  # field 3 (payload): an inner message {1: 1}
        bytes([0x20, 0x80, 0x94, 0xEB, 0xDC, 0x03]),  # field 4 (timeout_nano): varint of 1_000_000_000
        bytes([0x2A, 0x06, 0x0A, 0x01, *b"k", 0x12, 0x01, *b"v"]),  # field 5 (metadata): KeyValue{k: v}
    ]
)
REQUEST_FRAME = bytes([0, 0, 0, len(REQUEST_PAYLOAD), 0, 0, 0, 1, 0x01, 0x00]) + REQUEST_PAYLOAD

# ttrpc.Response{status: {} (present, empty, as containerd sends for OK), payload: 08 01} on stream 1
RESPONSE_FRAME = bytes([0, 0, 0, 6, 0, 0, 0, 1, 0x02, 0x00, 0x0A, 0x00, 0x12, 0x02, 0x08, 0x01])


def frame(stream_id: int, message_type: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return struct.pack(">IIBB", len(payload), stream_id, message_type, flags) + payload


def request_frame(stream_id: int, method: str = "M") -> bytes:
    payload = bytes([0x0A, 0x03, *b"svc", 0x12, len(method), *method.encode()])
    return frame(stream_id, MessageType.REQUEST, payload)


def send_check(client: Connection) -> tuple[int, bytes]:
    return client.send_request("svc", "M", b"\x08\x01", timeout_nano=1_000_000_000, metadata={"k": "v"})


def test_request_frame_bytes_match_the_wire_format() -> None:
    client = Connection(Role.CLIENT)
    stream_id, data = send_check(client)
    assert stream_id == 1
    assert data == REQUEST_FRAME
    assert client.open_streams == {1}


def test_server_decodes_the_request_and_answers_with_exact_bytes() -> None:
    server = Connection(Role.SERVER)
    assert server.receive_data(REQUEST_FRAME) == [
        RequestReceived(1, "svc", "M", b"\x08\x01", timeout_nano=1_000_000_000, metadata=(("k", "v"),))
    ]
    assert server.send_response(1, payload=b"\x08\x01") == RESPONSE_FRAME
    assert server.open_streams == frozenset()


def test_error_status_round_trips() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    stream_id, data = client.send_request("svc", "M", b"")
    server.receive_data(data)
    reply = server.send_response(stream_id, status_code=Code.NOT_FOUND, status_message="no")
    # Response{status: {code: 5, message: "no"}}
    assert reply == frame(1, 2, bytes([0x0A, 0x06, 0x08, 0x05, 0x12, 0x02, *b"no"]))
    assert client.receive_data(reply) == [ResponseReceived(1, Code.NOT_FOUND, "no", b"")]


def test_client_stream_ids_are_odd_and_increase() -> None:
    client = Connection(Role.CLIENT)
    assert [client.send_request("s", "m", b"")[0] for _ in range(4)] == [1, 3, 5, 7]


def test_partial_frames_fed_one_byte_at_a_time() -> None:
    server = Connection(Role.SERVER)
    events: list[Event] = []
    for index in range(len(REQUEST_FRAME)):
        got = server.receive_data(REQUEST_FRAME[index : index + 1])
        assert got == [] or index == len(REQUEST_FRAME) - 1
        events += got
    assert [type(event) for event in events] == [RequestReceived]
    client = Connection(Role.CLIENT)
    send_check(client)
    replies = [event for byte in RESPONSE_FRAME for event in client.receive_data(bytes([byte]))]
    assert replies == [ResponseReceived(1, 0, "", b"\x08\x01")]


def test_two_frames_in_one_chunk_and_a_split_third() -> None:
    server = Connection(Role.SERVER)
    third = request_frame(5, "C")
    events = server.receive_data(request_frame(1, "A") + request_frame(3, "B") + third[:4])
    assert [(e.stream_id, e.method) for e in events if isinstance(e, RequestReceived)] == [(1, "A"), (3, "B")]
    assert server.receive_data(third[4:]) == [RequestReceived(5, "svc", "C", b"")]


def test_oversized_request_is_skipped_and_answered_resource_exhausted() -> None:
    server = Connection(Role.SERVER)
    length = MAX_MESSAGE_SIZE + 1
    header = struct.pack(">IIBB", length, 1, MessageType.REQUEST, 0)
    # The payload arrives in pieces and is never buffered; the next frame still parses.
    [event] = server.receive_data(header + b"\0" * 1000)
    assert event == OversizedFrame(1, MessageType.REQUEST, length)
    assert isinstance(event, OversizedFrame)
    assert event.code is Code.RESOURCE_EXHAUSTED
    assert event.message == f"message length {length} exceed maximum message size of {MAX_MESSAGE_SIZE}"
    assert server.receive_data(b"\0" * (length - 2000)) == []
    assert server.receive_data(b"\0" * 1000 + request_frame(3)) == [RequestReceived(3, "svc", "M", b"")]
    reply = server.send_response(1, status_code=event.code, status_message=event.message)
    client = Connection(Role.CLIENT)
    client.send_request("svc", "M", b"")
    [answer] = client.receive_data(reply)
    assert isinstance(answer, ResponseReceived)
    assert (answer.status_code, answer.status_message) == (Code.RESOURCE_EXHAUSTED, event.message)


def test_oversized_response_fails_the_call_on_the_client() -> None:
    client = Connection(Role.CLIENT)
    stream_id, _ = client.send_request("svc", "M", b"")
    header = struct.pack(">IIBB", MAX_MESSAGE_SIZE + 10, stream_id, MessageType.RESPONSE, 0)
    assert client.receive_data(header) == [OversizedFrame(stream_id, MessageType.RESPONSE, MAX_MESSAGE_SIZE + 10)]
    assert client.open_streams == frozenset()


def test_sending_over_the_limit_is_refused_without_changing_state() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    with pytest.raises(MessageTooLarge) as caught:
        client.send_request("svc", "M", b"x" * MAX_MESSAGE_SIZE)
    assert caught.value.length > MAX_MESSAGE_SIZE
    stream_id, data = client.send_request("svc", "M", b"")
    assert stream_id == 1
    server.receive_data(data)
    with pytest.raises(MessageTooLarge):
        server.send_response(1, payload=b"x" * MAX_MESSAGE_SIZE)
    assert server.open_streams == {1}
    server.send_response(1, status_code=Code.RESOURCE_EXHAUSTED, status_message="too big")


def test_unknown_message_type_is_skipped() -> None:
    for role in Role:
        connection = Connection(role)
        if role is Role.CLIENT:
            connection.send_request("svc", "M", b"")
            good = frame(1, MessageType.RESPONSE)
        else:
            good = request_frame(1)
        events = connection.receive_data(frame(1, 0x7F, b"junk", flags=0x80) + good)
        assert events[0] == UnknownFrameReceived(1, 0x7F, 0x80, 4)
        assert type(events[1]) is (ResponseReceived if role is Role.CLIENT else RequestReceived)


def test_even_stream_id_is_rejected_with_invalid_argument() -> None:
    server = Connection(Role.SERVER)
    [event] = server.receive_data(request_frame(2))
    assert event == InvalidFrameReceived(
        2, MessageType.REQUEST, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
    )
    assert server.open_streams == frozenset()
    server.send_response(2, status_code=event.code, status_message=event.message)
    with pytest.raises(LocalProtocolError):
        server.send_response(2)  # the one owed answer was given


def test_reused_or_decreasing_stream_id_is_rejected() -> None:
    server = Connection(Role.SERVER)
    events = server.receive_data(request_frame(5) + request_frame(5) + request_frame(3) + request_frame(7))
    assert [type(e).__name__ for e in events] == [
        "RequestReceived",
        "InvalidFrameReceived",
        "InvalidFrameReceived",
        "RequestReceived",
    ]
    assert isinstance(events[1], InvalidFrameReceived)
    assert events[1].message == "StreamID cannot be re-used and must increment"
    assert server.open_streams == {5, 7}
    # The rejection and the real reply may both go out on stream 5, as containerd does.
    server.send_response(5, status_code=Code.INVALID_ARGUMENT, status_message=events[1].message)
    server.send_response(5)
    server.send_response(3, status_code=Code.INVALID_ARGUMENT)
    assert server.open_streams == {7}


def test_undecodable_request_is_rejected() -> None:
    server = Connection(Role.SERVER)
    [event] = server.receive_data(frame(1, MessageType.REQUEST, b"\x0a\xff"))
    assert isinstance(event, InvalidFrameReceived)
    assert event.code is Code.INVALID_ARGUMENT
    assert event.message.startswith("unmarshal request error")


def test_undecodable_response_fails_that_call() -> None:
    client = Connection(Role.CLIENT)
    client.send_request("svc", "M", b"")
    [event] = client.receive_data(frame(1, MessageType.RESPONSE, b"\x0a\xff"))
    assert isinstance(event, InvalidFrameReceived)
    assert (event.stream_id, event.code) == (1, Code.INTERNAL)
    assert client.open_streams == frozenset()


def test_stray_frames_are_reported_not_raised() -> None:
    client = Connection(Role.CLIENT)
    stream_id, _ = client.send_request("svc", "M", b"")
    client.abandon(stream_id)  # e.g. the call timed out
    events = client.receive_data(frame(stream_id, MessageType.RESPONSE, b"") + frame(2, MessageType.REQUEST))
    assert [type(e) for e in events] == [StrayFrameReceived, StrayFrameReceived]
    server = Connection(Role.SERVER)
    [event] = server.receive_data(frame(1, MessageType.RESPONSE))
    assert isinstance(event, StrayFrameReceived)


def test_data_frames_on_a_streaming_call() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    stream_id, data = client.send_request("svc", "Stream", b"", flags=Flags.REMOTE_OPEN)
    assert data[9] == Flags.REMOTE_OPEN
    [request] = server.receive_data(data)
    assert isinstance(request, RequestReceived)
    assert request.flags is Flags.REMOTE_OPEN
    first = client.send_data(stream_id, b"\x08\x01")
    assert first == frame(1, MessageType.DATA, b"\x08\x01")
    last = client.send_data(stream_id, None, close=True)
    assert last == frame(1, MessageType.DATA, b"", flags=Flags.REMOTE_CLOSED | Flags.NO_DATA)
    with pytest.raises(LocalProtocolError):
        client.send_data(stream_id, b"")
    assert server.receive_data(first + last) == [
        DataReceived(1, b"\x08\x01"),
        DataReceived(1, b"", remote_closed=True, no_data=True),
    ]
    # After the client closed its side, more data on the stream is dropped.
    [late] = server.receive_data(frame(1, MessageType.DATA, b"x"))
    assert isinstance(late, StrayFrameReceived)
    # The server streams back and ends with data [RC]: the call is finished on both sides.
    replies = server.send_data(1, b"\x08\x02") + server.send_data(1, b"", close=True)
    assert server.open_streams == frozenset()
    assert client.receive_data(replies) == [DataReceived(1, b"\x08\x02"), DataReceived(1, b"", remote_closed=True)]
    assert client.open_streams == frozenset()


def test_data_on_a_stream_that_is_not_open() -> None:
    server = Connection(Role.SERVER)
    [event] = server.receive_data(frame(9, MessageType.DATA, b"x"))
    assert event == InvalidFrameReceived(9, MessageType.DATA, Code.INVALID_ARGUMENT, "StreamID is no longer active")
    client = Connection(Role.CLIENT)
    [event2] = client.receive_data(frame(9, MessageType.DATA, b"x"))
    assert isinstance(event2, StrayFrameReceived)


def test_end_of_file() -> None:
    client = Connection(Role.CLIENT)
    client.send_request("svc", "M", b"")
    assert client.receive_eof() == [PeerClosed((1,))]
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"x")
    server = Connection(Role.SERVER)
    server.receive_data(REQUEST_FRAME[:-1])
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        server.receive_eof()


def test_misuse_is_a_local_protocol_error() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        client.send_response(1)
    with pytest.raises(LocalProtocolError):
        server.send_request("svc", "M", b"")
    with pytest.raises(LocalProtocolError):
        server.send_response(1)
    with pytest.raises(LocalProtocolError):
        client.send_data(1, b"")
    with pytest.raises(LocalProtocolError):
        client.send_request("svc", "M", b"", flags=Flags.REMOTE_OPEN | Flags.REMOTE_CLOSED)


# ------------------------------------------------------------------- fuzzing


def feed(role: Role, chunks: list[bytes]) -> list[Event]:
    connection = Connection(role)
    if role is Role.CLIENT:
        for _ in range(4):
            connection.send_request("svc", "M", b"")  # streams 1, 3, 5, 7 open
    events: list[Event] = []
    for chunk in chunks:
        events += connection.receive_data(chunk)
    try:
        events += connection.receive_eof()
    except RemoteProtocolError:
        events.append(PeerClosed(()))  # marker: ended mid-frame
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[start:end] for start, end in zip([0, *points], [*points, len(data)], strict=True)]


frames = st.builds(
    lambda stream_id, message_type, flags, payload: frame(stream_id, message_type, payload, flags),
    st.integers(0, 12),
    st.integers(0, 5),
    st.integers(0, 255),
    st.binary(max_size=40) | st.sampled_from([REQUEST_PAYLOAD, RESPONSE_FRAME[10:], b"\x0a\x00"]),
)
oversized_headers = st.integers(MAX_MESSAGE_SIZE + 1, (1 << 32) - 1).map(lambda n: struct.pack(">IIBB", n, 1, 1, 0))


@settings(max_examples=300, deadline=None)
@given(
    role=st.sampled_from(Role),
    parts=st.lists(frames | st.binary(max_size=30) | oversized_headers, max_size=8),
    cuts=st.lists(st.integers(0, 10_000), max_size=10),
)
def test_fuzz_receive_only_raises_remote_protocol_error_and_ignores_chunking(
    role: Role, parts: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(parts)
    whole = feed(role, [data])  # anything but RemoteProtocolError escapes and fails the test
    assert feed(role, split(data, cuts)) == whole
