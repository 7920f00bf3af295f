"""containerd 1.6's shim v2, event and metrics messages, and the wire helpers around them.

Expected bytes are written out by hand from the protobuf encoding rules (tag = field << 3 | wire
type; 0 varint, 2 length-delimited) and the field numbers of containerd's .proto files, not
produced by the code under test.  The service tables are containerd 1.6's runtime/v2/task/shim.proto
and api/services/ttrpc/events/v1/events.proto, copied by hand.
"""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2, empty_pb2, message_factory, timestamp_pb2
from google.protobuf.message import Message

from capsa.errors import InvalidArgument
from capsa.protocols.containerd.cgroups.v2 import metrics_pb2
from capsa.protocols.containerd.events import task_pb2 as events
from capsa.protocols.containerd.services.events.ttrpc.v1 import events_pb2
from capsa.protocols.containerd.task.v2 import shim_pb2
from capsa.protocols.containerd.types import mount_pb2
from capsa.protocols.containerd.types.task import task_pb2
from capsa.shim.v2 import wire

# 1_700_000_000 as a varint: 7-bit groups 0x00, 0x62, 0x4f, 0x2a, 0x06, low group first.
SECONDS_1_7E9 = b"\x80\xe2\xcf\xaa\x06"


def test_create_task_request_golden_bytes() -> None:
    request = shim_pb2.CreateTaskRequest(
        id="c1",
        bundle="/b",
        rootfs=[mount_pb2.Mount(type="overlay", source="overlay", options=["ro"])],
        terminal=True,
        stdout="/o",
    )
    mount = b"\x0a\x07overlay" + b"\x12\x07overlay" + b"\x22\x02ro"  # type=1, source=2, options=4
    assert len(mount) == 0x16
    expected = (
        b"\x0a\x02c1"  # id = 1
        + b"\x12\x02/b"  # bundle = 2
        + b"\x1a\x16" + mount  # rootfs = 3
        + b"\x20\x01"  # terminal = 4 (varint)
        + b"\x32\x02/o"  # stdout = 6
    )
    assert request.SerializeToString() == expected
    assert shim_pb2.CreateTaskRequest.FromString(expected) == request


def test_wait_response_golden_bytes() -> None:
    response = shim_pb2.WaitResponse(exit_status=137, exited_at=timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5))
    stamp = b"\x08" + SECONDS_1_7E9 + b"\x10\x05"
    expected = b"\x08\x89\x01" + b"\x12\x08" + stamp  # exit_status = 1 (137 = 0x89 0x01), exited_at = 2
    assert response.SerializeToString() == expected


def test_update_task_request_annotations_are_a_map_of_entries() -> None:
    request = shim_pb2.UpdateTaskRequest(id="c", annotations={"k": "v"})
    # Field 3, one entry message: key = 1, value = 2.
    assert request.SerializeToString() == b"\x0a\x01c" + b"\x1a\x06" + b"\x0a\x01k\x12\x01v"


def test_forward_request_with_envelope_and_any_golden_bytes() -> None:
    exit_event = events.TaskExit(container_id="c1", pid=42, exit_status=1)
    event_bytes = b"\x0a\x02c1" + b"\x18\x2a" + b"\x20\x01"  # container_id = 1, pid = 3, exit_status = 4
    assert exit_event.SerializeToString() == event_bytes
    assert len(event_bytes) == 8

    envelope = events_pb2.Envelope(
        timestamp=wire.timestamp(1_700_000_000 * 1_000_000_000),
        namespace="default",
        topic=wire.event_topic(exit_event),
        event=wire.pack_any(exit_event),
    )
    packed = b"\x0a\x1acontainerd.events.TaskExit" + b"\x12\x08" + event_bytes  # Any: type_url = 1, value = 2
    expected_envelope = (
        b"\x0a\x06\x08" + SECONDS_1_7E9  # timestamp = 1 (nanos 0 is not sent)
        + b"\x12\x07default"  # namespace = 2
        + b"\x1a\x0b/tasks/exit"  # topic = 3
        + b"\x22\x26" + packed  # event = 4
    )
    assert envelope.SerializeToString() == expected_envelope
    assert len(expected_envelope) == 0x46
    assert events_pb2.ForwardRequest(envelope=envelope).SerializeToString() == b"\x0a\x46" + expected_envelope


def test_cgroup_v2_metrics_golden_bytes() -> None:
    metrics = metrics_pb2.Metrics(
        pids=metrics_pb2.PidsStat(current=3), memory=metrics_pb2.MemoryStat(usage=4096)
    )
    # pids = 1 {current = 1}; memory = 4 {usage = 32: tag 256 = 0x80 0x02, 4096 = 0x80 0x20}.
    assert metrics.SerializeToString() == b"\x0a\x02\x08\x03" + b"\x22\x04\x80\x02\x80\x20"


def test_type_urls_are_bare_full_names() -> None:
    assert wire.pack_any(events.TaskCreate()).type_url == "containerd.events.TaskCreate"
    assert wire.pack_any(metrics_pb2.Metrics()).type_url == "io.containerd.cgroups.v2.Metrics"
    assert wire.type_url(shim_pb2.DeleteResponse) == "containerd.task.v2.DeleteResponse"
    assert wire.type_url(task_pb2.ProcessInfo) == "containerd.v1.types.ProcessInfo"


def test_unpack_any_round_trip_and_refusals() -> None:
    event = events.TaskExecStarted(container_id="c1", exec_id="e1", pid=7)
    assert wire.unpack_any(wire.pack_any(event), events.TaskExecStarted) == event
    prefixed = any_pb2.Any(
        type_url="type.googleapis.com/containerd.events.TaskExecStarted", value=event.SerializeToString()
    )
    assert wire.unpack_any(prefixed, events.TaskExecStarted) == event
    with pytest.raises(InvalidArgument, match=r"containerd\.events\.TaskStart.*TaskExecStarted"):
        wire.unpack_any(wire.pack_any(event), events.TaskStart)
    json_any = any_pb2.Any(type_url=wire.OCI_PROCESS_TYPE_URL, value=b'{"args":["sh"]}')
    with pytest.raises(InvalidArgument, match="runtime-spec/1/Process"):
        wire.unpack_any(json_any, events.TaskStart)
    truncated = any_pb2.Any(type_url="containerd.events.TaskStart", value=b"\x0a\x05c1")
    with pytest.raises(InvalidArgument, match="undecodable"):
        wire.unpack_any(truncated, events.TaskStart)


@pytest.mark.parametrize(
    ("event", "topic"),
    [
        (events.TaskCreate(), "/tasks/create"),
        (events.TaskStart(), "/tasks/start"),
        (events.TaskDelete(), "/tasks/delete"),
        (events.TaskExit(), "/tasks/exit"),
        (events.TaskOOM(), "/tasks/oom"),
        (events.TaskExecAdded(), "/tasks/exec-added"),
        (events.TaskExecStarted(), "/tasks/exec-started"),
        (events.TaskPaused(), "/tasks/paused"),
        (events.TaskResumed(), "/tasks/resumed"),
        (events.TaskCheckpointed(), "/tasks/checkpointed"),
    ],
)
def test_event_topics(event: Message, topic: str) -> None:
    assert wire.event_topic(event) == topic


def test_event_topic_refuses_what_is_not_a_task_event() -> None:
    for not_an_event in (events.TaskIO(), shim_pb2.WaitResponse()):
        with pytest.raises(InvalidArgument, match="not a containerd task event"):
            wire.event_topic(not_an_event)


def test_timestamp_splits_nanoseconds() -> None:
    assert wire.timestamp(1_700_000_000_000_000_005) == timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5)
    assert wire.timestamp(0) == timestamp_pb2.Timestamp()
    assert wire.timestamp(-1) == timestamp_pb2.Timestamp(seconds=-1, nanos=999_999_999)


def _methods(service_full_name: str, module: object) -> dict[str, tuple[type[Message], type[Message]]]:
    descriptor = module.DESCRIPTOR.services_by_name[service_full_name.rsplit(".", 1)[-1]]  # type: ignore[attr-defined]
    assert descriptor.full_name == service_full_name
    return {
        m.name: (message_factory.GetMessageClass(m.input_type), message_factory.GetMessageClass(m.output_type))
        for m in descriptor.methods
    }


def test_task_service_methods_match_containerd() -> None:
    s = shim_pb2
    expected = {
        "State": (s.StateRequest, s.StateResponse),
        "Create": (s.CreateTaskRequest, s.CreateTaskResponse),
        "Start": (s.StartRequest, s.StartResponse),
        "Delete": (s.DeleteRequest, s.DeleteResponse),
        "Pids": (s.PidsRequest, s.PidsResponse),
        "Pause": (s.PauseRequest, empty_pb2.Empty),
        "Resume": (s.ResumeRequest, empty_pb2.Empty),
        "Checkpoint": (s.CheckpointTaskRequest, empty_pb2.Empty),
        "Kill": (s.KillRequest, empty_pb2.Empty),
        "Exec": (s.ExecProcessRequest, empty_pb2.Empty),
        "ResizePty": (s.ResizePtyRequest, empty_pb2.Empty),
        "CloseIO": (s.CloseIORequest, empty_pb2.Empty),
        "Update": (s.UpdateTaskRequest, empty_pb2.Empty),
        "Wait": (s.WaitRequest, s.WaitResponse),
        "Stats": (s.StatsRequest, s.StatsResponse),
        "Connect": (s.ConnectRequest, s.ConnectResponse),
        "Shutdown": (s.ShutdownRequest, empty_pb2.Empty),
    }
    assert _methods(wire.TASK_SERVICE, shim_pb2) == expected


def test_events_service_has_forward() -> None:
    assert _methods(wire.EVENTS_SERVICE, events_pb2) == {"Forward": (events_pb2.ForwardRequest, empty_pb2.Empty)}


def test_status_enum_numbers() -> None:
    assert dict(task_pb2.Status.items()) == {
        "UNKNOWN": 0,
        "CREATED": 1,
        "RUNNING": 2,
        "STOPPED": 3,
        "PAUSED": 4,
        "PAUSING": 5,
    }
    # StateResponse.status = 4, an enum on the wire as a varint.
    assert shim_pb2.StateResponse(status=task_pb2.RUNNING).SerializeToString() == b"\x20\x02"
