"""A guest that turns against its host, through the real agent channel (virtio-serial, QEMU).

Two ways in from the guest, each shown here:

- a privileged container makes the agent port's device node and writes to it: the
  port is open in the agent already, and virtio-console lets one opener at a time
  (EBUSY), so a container, even with every capability, cannot speak on the channel;
- root in the guest (a container escape, or a guest kernel bug) owns PID 1: here the
  guest's /init is replaced by a hostile one (a newc archive appended to our own
  initrd overrides ``/init``, as the kernel's initramfs unpacking does with later
  entries).  It answers the host's ``Check``, then floods the channel with ttrpc
  garbage (frames at the 4 MiB limit on streams never opened, frames over it, frames
  of unknown types, data on unary calls, requests to the host) and never answers
  again.  The host must bound what that costs it: ``capsa create`` fails with one
  clean line when its request times out, the proxy's memory stays flat however much
  the guest sends, its log stays short, nothing is left behind, and another
  container's VM goes on untouched throughout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from harness import Capsa

from capsa.config import load_config

pytestmark = pytest.mark.vm

HOSTILE_INIT = r"""#!/usr/bin/python3.11 -SIB
# A hostile guest for tests/integration/test_hostile_guest_vm.py (not part of capsa).
import os
import struct
import sys
import time

sys.path.insert(0, "/usr/lib/capsa/python")
from capsa.agent import channel, init
from capsa.protocols import agent_pb2
from capsa.ttrpc.codec import MAX_MESSAGE_SIZE, Connection, RequestReceived, Role

FLOOD_BYTES = 1 << 30
FLOOD_SECONDS = 12


def say(text):
    with open("/dev/console", "w") as console:
        console.write(f"hostile: {text}\n")


def frame(stream_id, kind, payload, flags=0, length=None):
    return struct.pack(">IIBB", len(payload) if length is None else length, stream_id, kind, flags) + payload


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def flood(fd):
    junk = (
        frame(1, 77, b"z" * 100)  # a type nobody knows
        + frame(2, 2, b"\xff" * 50)  # a response on a stream never opened
        + frame(3, 3, b"d", 1)  # data closing a unary call
        + frame(0, 1, b"\x0a\x01")  # a request to the host
    ) * 1000
    at_limit = frame(4, 2, bytes(MAX_MESSAGE_SIZE))  # the largest legal frame, for nobody
    over = frame(6, 2, b"", length=MAX_MESSAGE_SIZE + 1) + bytes(MAX_MESSAGE_SIZE + 1)
    sent, started, report = 0, time.monotonic(), 0
    while sent < FLOOD_BYTES and time.monotonic() - started < FLOOD_SECONDS:
        for chunk in (junk, at_limit, over):
            write_all(fd, chunk)
            sent += len(chunk)
        if sent >= report:
            say(f"{sent >> 20} MiB sent")
            report += 8 << 20
    write_all(fd, frame(8, 2, bytes(MAX_MESSAGE_SIZE - 1), length=MAX_MESSAGE_SIZE))
    say(f"done: {sent >> 20} MiB sent in {time.monotonic() - started:.1f} s; the last frame never ends")


init.mount_api_filesystems()
while not ((name := channel.find_port("capsa.agent")) and os.path.exists("/dev/" + name)):
    time.sleep(0.01)
fd = os.open("/dev/" + name, os.O_RDWR)
connection = Connection(Role.SERVER)
say("serving Check honestly")
while True:
    data = os.read(fd, 65536)
    if not data:
        time.sleep(0.01)  # the host is not connected yet
        continue
    for event in connection.receive_data(data):
        if not isinstance(event, RequestReceived):
            continue
        if event.method == "Check":
            serving = agent_pb2.CheckResponse(status=agent_pb2.CheckResponse.SERVING)
            write_all(fd, connection.send_response(event.stream_id, payload=serving.SerializeToString()))
            continue
        say(f"flooding instead of answering {event.method}")
        flood(fd)
        while True:
            time.sleep(3600)
"""

# A privileged container's attempt on the agent port; then it stays up as the neighbour.
TRY_THE_PORT = """
for port in /sys/class/virtio-ports/*; do
  case "$(cat $port/name)" in capsa.agent)
    dev=$(cat $port/dev)
    mknod /dev/agent-port c ${dev%:*} ${dev#*:}
    if echo garbage > /dev/agent-port; then echo PORT-WRITTEN; else echo PORT-REFUSED; fi;;
  esac
done
echo neighbour-ready
exec sleep 600
"""


def newc(name: str, data: bytes, mode: int) -> bytes:
    """One entry of a cpio "newc" archive (the initramfs format, buffer-format.rst)."""
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    entry = header + name.encode() + b"\0"
    entry += b"\0" * (-len(entry) % 4)
    return entry + data + b"\0" * (-len(data) % 4)


def hostile_initrd(directory: Path) -> Path:
    """capsa's own initrd with a hostile /init appended (a later archive's file wins)."""
    initrd = load_config().hypervisor.initrd
    assert initrd is not None
    base = initrd.resolve().read_bytes()
    archive = newc("init", HOSTILE_INIT.encode(), 0o100755) + newc("TRAILER!!!", b"", 0)
    path = directory / "hostile-initrd.img"
    path.write_bytes(base + b"\0" * (-len(base) % 4) + archive)
    path.chmod(0o644)
    return path


def proxy_pid(capsa: Capsa, cid: str) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"capsa.proxy" in argv and str(capsa.root).encode() in argv and f"--id={cid}".encode() in argv:
            return int(pid)
    return None


def rss_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had (proc(5))."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def privileged(capsa: Capsa, script: str) -> None:
    capsa.spec(["sh", "-c", script])
    spec = json.loads((capsa.bundle / "config.json").read_text())
    caps = [f"CAP_{name}" for name in ("CHOWN", "DAC_OVERRIDE", "FOWNER", "MKNOD", "SYS_ADMIN")]
    spec["process"]["capabilities"] = {k: caps for k in ("bounding", "effective", "permitted")}
    spec["linux"].setdefault("resources", {})["devices"] = [{"allow": True, "access": "rwm"}]
    (capsa.bundle / "config.json").write_text(json.dumps(spec))
    link = capsa.bundle / "rootfs" / "bin" / "mknod"
    if not link.exists():
        os.symlink("busybox", link)


def test_a_hostile_guest_costs_its_host_a_bounded_amount_and_touches_no_other_vm(capsa: Capsa, tmp_path: Path) -> None:
    privileged(capsa, TRY_THE_PORT)
    neighbour_out = tmp_path / "neighbour.out"
    with open(neighbour_out, "wb") as out:
        created = capsa.popen("create", "--bundle", str(capsa.bundle), "neighbour", stdout=out)
        assert created.wait(timeout=180) == 0
    hostile: subprocess.Popen[bytes] | None = None
    try:
        assert capsa("start", "neighbour").code == 0
        deadline = time.monotonic() + 60
        while "neighbour-ready" not in neighbour_out.read_text():
            assert time.monotonic() < deadline, neighbour_out.read_text()
            time.sleep(0.2)
        # The port is the agent's: a second opener is refused (EBUSY), capabilities or not.
        assert "PORT-REFUSED" in neighbour_out.read_text(), neighbour_out.read_text()

        config = tmp_path / "hostile.toml"
        config.write_text(
            f'[hypervisor]\ninitrd = "{hostile_initrd(tmp_path)}"\nimage = ""\nboot = "cold"\n'
            "[agent]\nrequest_timeout = 20.0\n"
        )
        errors = tmp_path / "hostile.err"
        with open(errors, "wb") as err:
            hostile = capsa.popen(
                "--config", str(config), "create", "--bundle", str(capsa.bundle), "hostile", stderr=err
            )
        console = capsa.root / "hostile" / "console.log"
        seen = ""
        deadline = time.monotonic() + 120
        while "hostile: flooding" not in seen:
            assert hostile.poll() is None and time.monotonic() < deadline, (seen, errors.read_text())
            seen = console.read_text(errors="replace") if console.exists() else ""
            time.sleep(0.1)
        proxy = proxy_pid(capsa, "hostile")
        assert proxy is not None
        at_start = rss_kib(proxy)
        peak, log_size, neighbour_calls = at_start, 0, 0
        while hostile.poll() is None:
            try:
                peak = max(peak, rss_kib(proxy))
                log_size = max(log_size, (capsa.root / "hostile" / "proxy.log").stat().st_size)
                seen = console.read_text(errors="replace")
            except OSError:
                pass  # the proxy is going: the create fails any moment now
            if neighbour_calls < 3:
                # Meanwhile the neighbour's VM answers as ever.
                execed = capsa("exec", "neighbour", "echo", "alive")
                assert (execed.code, execed.stdout) == (0, "alive\n"), execed.stderr
                neighbour_calls += 1
            time.sleep(0.25)

        # The create failed with one line, when its request to the agent timed out.
        assert hostile.returncode != 0
        lines = errors.read_text().strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in lines[0], lines
        assert "CreateSandbox" in lines[0] or "DEADLINE" in lines[0] or "no reply" in lines[0], lines
        sent = max((int(m) for m in re.findall(r"hostile: (?:done: )?(\d+) MiB sent", seen)), default=0)
        # However much came (at least ten frames at the limit), the proxy held about one.
        assert sent >= 40, seen[-2000:]
        assert (peak - at_start) < 24 * 1024, f"the proxy grew by {(peak - at_start) >> 10} MiB for {sent} MiB sent"
        assert log_size < 16 * 1024, f"proxy.log reached {log_size} bytes"
        assert neighbour_calls >= 1
        assert capsa("state", "hostile").code != 0  # nothing of it is left (the fixture checks the rest)
        # And the neighbour still answers afterwards.
        execed = capsa("exec", "neighbour", "echo", "alive")
        assert (execed.code, execed.stdout) == (0, "alive\n"), execed.stderr
    finally:
        if hostile is not None and hostile.poll() is None:
            hostile.kill()
            hostile.wait()
        capsa("delete", "--force", "neighbour")
        capsa("delete", "--force", "hostile")
