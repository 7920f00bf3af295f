"""containerd 1.6's conventions around the shim v2 messages: ``Any`` type URLs, event topics, timestamps.

Pure functions and constants, no I/O.  The facts, as containerd 1.6.20 (Debian 12) has them:

``Any`` type URLs
    containerd 1.6 packs and unpacks ``google.protobuf.Any`` with ``github.com/containerd/typeurl``
    v1: a protobuf message's URL is its bare full name (``TypeURL`` falls back to
    ``proto.MessageName``), and ``UnmarshalAny`` looks the URL up as an exact name in gogo's
    registry.  So an event goes out as ``"containerd.events.TaskExit"``, with no
    ``"type.googleapis.com/"`` prefix (Python's ``Any.Pack`` would add one, and containerd would
    answer "not found").  Types registered with ``typeurl.Register`` are JSON, not protobuf, under
    ``"types.containerd.io/..."``: containerd sends the OCI ``Process`` of ``Exec`` and the
    ``LinuxResources`` of ``Update`` that way (:data:`OCI_PROCESS_TYPE_URL`,
    :data:`OCI_LINUX_RESOURCES_TYPE_URL`).

Metrics
    ``StatsResponse.stats`` is handed to clients unchanged; ``ctr task metrics`` (and the CRI
    plugin) decode it with ``typeurl.UnmarshalAny`` and switch on the resulting type, so the type
    URL alone decides: ``"io.containerd.cgroups.v2.Metrics"`` selects the cgroup v2 table
    (pids.current/limit, cpu.usage_usec..., memory.usage/usage_limit/swap_usage/swap_limit),
    ``"io.containerd.cgroups.v1.Metrics"`` the v1 one.

Namespace
    Every ttrpc call between containerd and a shim, both ways, carries the containerd namespace
    in the request metadata under :data:`NAMESPACE_METADATA_KEY` (``containerd-namespace-ttrpc``,
    containerd's ``namespaces.TTRPCHeader``).  ``Events.Forward`` itself takes the namespace from
    ``Envelope.namespace``.

Topics
    containerd's ``runtime`` package names one topic per task event (:func:`event_topic`);
    runc's shim publishes with them, and containerd's task manager matches on them.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message

from capsa.errors import InvalidArgument
from capsa.protocols.containerd.events import task_pb2 as events

#: ttrpc metadata key holding the containerd namespace (containerd ``namespaces/ttrpc.go``).
NAMESPACE_METADATA_KEY = "containerd-namespace-ttrpc"
#: Environment variable with containerd's ttrpc socket, where ``Events.Forward`` is served.
TTRPC_ADDRESS_ENV = "TTRPC_ADDRESS"
#: Fully qualified service names, as ttrpc requests carry them.
TASK_SERVICE = "containerd.task.v2.Task"
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
#: JSON-encoded OCI types containerd puts in ``Any``: registered with ``typeurl.Register`` as
#: "types.containerd.io" / "opencontainers/runtime-spec" / spec major version / type name.
OCI_PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
OCI_LINUX_RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"

_M = TypeVar("_M", bound=Message)

_TOPICS: dict[type[Message], str] = {
    events.TaskCreate: "/tasks/create",
    events.TaskStart: "/tasks/start",
    events.TaskOOM: "/tasks/oom",
    events.TaskExit: "/tasks/exit",
    events.TaskDelete: "/tasks/delete",
    events.TaskExecAdded: "/tasks/exec-added",
    events.TaskExecStarted: "/tasks/exec-started",
    events.TaskPaused: "/tasks/paused",
    events.TaskResumed: "/tasks/resumed",
    events.TaskCheckpointed: "/tasks/checkpointed",
}

_NANOS_PER_SECOND = 1_000_000_000


def type_url(message_type: type[Message] | Message) -> str:
    """The type URL containerd 1.6 uses for a protobuf message: its bare full name."""
    return str(message_type.DESCRIPTOR.full_name)


def pack_any(message: Message) -> any_pb2.Any:
    """Wrap ``message`` in an ``Any`` the way containerd's typeurl v1 does (bare full name as URL)."""
    return any_pb2.Any(type_url=type_url(message), value=message.SerializeToString())


def unpack_any(value: any_pb2.Any, message_type: type[_M]) -> _M:
    """Decode ``value`` as ``message_type``; refuse an ``Any`` holding anything else.

    A URL with a ``host/`` prefix is accepted when its last segment names the type (what
    protobuf's own ``Any.Unpack`` accepts), so a peer using the ``type.googleapis.com/``
    convention still decodes.  Raises :class:`InvalidArgument` for another type or bad bytes.
    """
    expected = type_url(message_type)
    if value.type_url.rsplit("/", 1)[-1] != expected:
        raise InvalidArgument(f"expected an Any holding {expected}, got {value.type_url!r}")
    message = message_type()
    try:
        message.ParseFromString(value.value)
    except DecodeError as err:
        raise InvalidArgument(f"undecodable {expected} in Any: {err}") from err
    return message


def event_topic(event: Message) -> str:
    """The topic containerd files a task event under (containerd ``runtime/events.go``)."""
    try:
        return _TOPICS[type(event)]
    except KeyError:
        raise InvalidArgument(f"{type_url(event)} is not a containerd task event") from None


def timestamp(now_ns: int) -> timestamp_pb2.Timestamp:
    """A ``google.protobuf.Timestamp`` for ``now_ns`` nanoseconds since the epoch (``time.time_ns()``).

    ``divmod`` keeps ``nanos`` in [0, 1e9) for times before 1970 too, as the Timestamp spec requires.
    """
    seconds, nanos = divmod(now_ns, _NANOS_PER_SECOND)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
