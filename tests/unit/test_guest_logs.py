"""The guest's console on the host: its last words in errors, its lines in the journal."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest

from capsa.hypervisor import guest_console, journal
from capsa.hypervisor.bounded_log import BoundedLog, pump
from capsa.proxy.launch import STOPPED_FILE, read_stopped
from capsa.proxy.proxy import stop_report

PANIC = """\
[    6.801234] capsa-agent: container c1 started
[    6.864308] Kernel panic - not syncing: Out of memory: compulsory panic_on_oom is enabled
[    6.867667] CPU: 0 PID: 36 Comm: busybox Not tainted 6.1.192-capsa #2
[    6.871870] Call Trace:
[    6.872326]  <TASK>
[    6.872521]  dump_stack_lvl+0x33/0x46
[    6.894153] Kernel Offset: disabled
"""


# --- last words ---------------------------------------------------------------------


def test_a_panic_is_quoted_by_its_own_line_not_its_call_trace() -> None:
    words = guest_console.last_words(PANIC)
    assert words == ("Kernel panic - not syncing: Out of memory: compulsory panic_on_oom is enabled",)
    assert guest_console.panicked(words)
    assert stop_report("QEMU", words) == (
        "the guest kernel panicked; guest console: "
        "Kernel panic - not syncing: Out of memory: compulsory panic_on_oom is enabled"
    )


def test_otherwise_the_last_lines_are_quoted_on_one_line() -> None:
    text = "[ 1.0] one\r\n\n[ 2.0] two\x1b[0m\n   \n[ 3.0] three\tand   more\n[ 4.0] four\n"
    words = guest_console.last_words(text)
    assert words == ("two [0m", "three and more", "four")
    assert not guest_console.panicked(words)
    quoted = "guest console: two [0m | three and more | four"
    assert stop_report("virtiofsd for /x", words) == f"virtiofsd for /x exited; {quoted}"
    assert stop_report("QEMU", ()) == "QEMU exited; the guest console printed nothing"


def test_a_quoted_line_is_bounded() -> None:
    (word,) = guest_console.last_words("x" * 10_000, count=1)
    assert len(word) == guest_console.MAX_QUOTED_CHARS
    assert word.endswith("...")


def test_only_the_end_of_the_log_is_read(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"old line\n" * 20_000 + PANIC.encode())
    tail = guest_console.read_tail(log, size=4096)
    assert len(tail.encode()) <= 4096
    assert tail.endswith("Kernel Offset: disabled\n")
    assert guest_console.read_tail(tmp_path / "gone.log") == ""


def test_the_stop_record_is_read_back_until_delete(tmp_path: Path) -> None:
    assert read_stopped(tmp_path) is None
    (tmp_path / STOPPED_FILE).write_text("the guest kernel panicked; guest console: Kernel panic\n")
    assert read_stopped(tmp_path) == "the guest kernel panicked; guest console: Kernel panic"


# --- the journal's native protocol ----------------------------------------------------


def parse_entry(data: bytes) -> dict[str, bytes]:
    """journald's reading of a native datagram (systemd.io JOURNAL_NATIVE_PROTOCOL)."""
    fields: dict[str, bytes] = {}
    while data:
        line_end = data.index(b"\n")
        head = data[:line_end]
        if b"=" in head:
            key, value = head.split(b"=", 1)
            data = data[line_end + 1 :]
        else:
            key = head
            (size,) = struct.unpack("<Q", data[line_end + 1 : line_end + 9])
            value = data[line_end + 9 : line_end + 9 + size]
            assert data[line_end + 9 + size : line_end + 10 + size] == b"\n"
            data = data[line_end + 10 + size :]
        fields[key.decode()] = value
    return fields


def test_entries_in_the_native_protocol() -> None:
    assert journal.entry({"MESSAGE": "hello", "PRIORITY": "6"}) == b"MESSAGE=hello\nPRIORITY=6\n"
    binary = journal.entry({"MESSAGE": b"two\nlines"})
    assert binary == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n"
    assert parse_entry(binary) == {"MESSAGE": b"two\nlines"}
    for bad in ("message", "_PID", "A-B", "", "K" * 65):
        with pytest.raises(ValueError):
            journal.entry({bad: "x"})


def test_a_console_line_names_the_guest_and_the_sandbox() -> None:
    fields = parse_entry(journal.console_entry(b"[ 1.0] virtio: ok", "web-1"))
    assert fields == {
        "MESSAGE": b"[ 1.0] virtio: ok",
        "PRIORITY": b"6",
        "SYSLOG_IDENTIFIER": b"capsa-guest",
        "CAPSA_SANDBOX": b"web-1",
    }
    panic = parse_entry(journal.console_entry(b"[ 6.8] Kernel panic - not syncing: Fatal exception", "web-1"))
    assert panic["PRIORITY"] == b"0"


def test_console_bytes_become_whole_lines() -> None:
    lines = journal.LineSplitter(max_line=8)
    assert lines.feed(b"ab") == []
    assert lines.feed(b"c\r\n\r\nde") == [b"abc"]
    assert lines.feed(b"fghijklmnopq\n") == [b"defghijk", b"lmnopq"]
    assert lines.feed(b"0123456789") == [b"01234567"]  # a guest that sends no newline holds 8 bytes at most
    assert lines.flush() == [b"89"]
    assert lines.flush() == []


def datagram_server(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    return server


def test_lines_go_to_the_journal_socket(tmp_path: Path) -> None:
    path = tmp_path / "journal.socket"
    assert journal.ConsoleJournal.open("s1", path) is None  # no journald: the log file is all there is
    with datagram_server(path) as server:
        console = journal.ConsoleJournal.open("s1", path)
        assert console is not None
        console.feed(b"[ 0.1] first\n[ 0.2] sec")
        console.feed(b"ond\n[ 0.3] unfinished")
        console.close()
        server.setblocking(False)
        received = []
        with pytest.raises(BlockingIOError):
            while True:
                received.append(parse_entry(server.recv(65536)))
    assert [entry["MESSAGE"] for entry in received] == [b"[ 0.1] first", b"[ 0.2] second", b"[ 0.3] unfinished"]
    assert {entry["CAPSA_SANDBOX"] for entry in received} == {b"s1"}


def test_a_journal_that_cannot_take_more_costs_lines_never_a_wait(tmp_path: Path) -> None:
    path = tmp_path / "journal.socket"
    with datagram_server(path):  # it never reads: its queue fills
        sender = journal.JournalSender(path)
        results = [sender.send(journal.entry({"MESSAGE": "x" * 1000})) for _ in range(5000)]
        assert results[0] is True
        assert results[-1] is False  # EAGAIN: dropped, not waited for
        assert sender.dropped == results.count(False)
        sender.close()
    # journald gone (its socket removed): dropped too.
    sender = journal.JournalSender(path)
    assert sender.send(b"MESSAGE=x\n") is False
    sender.close()


def test_the_console_pump_feeds_the_log_and_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal.socket"
    with datagram_server(path) as server:
        ours, theirs = socket.socketpair()
        console = journal.ConsoleJournal.open("s2", path)
        log = BoundedLog(tmp_path / "console.log")

        async def main() -> None:
            task = asyncio.ensure_future(pump(ours, log, console))
            theirs.sendall(b"[ 1.0] Linux version 6.1\n[ 1.1] Kernel panic - not syncing: test\n")
            theirs.close()
            await task

        asyncio.run(main())
        messages = [parse_entry(server.recv(65536)) for _ in range(2)]
    assert (tmp_path / "console.log").read_bytes().endswith(b"not syncing: test\n")
    assert [(m["MESSAGE"], m["PRIORITY"]) for m in messages] == [
        (b"[ 1.0] Linux version 6.1", b"6"),
        (b"[ 1.1] Kernel panic - not syncing: test", b"0"),
    ]


def test_journald_is_recognised_by_its_socket(tmp_path: Path) -> None:
    path = tmp_path / "socket"
    assert not journal.journald_running(path)
    path.write_text("")  # a file is not journald
    assert not journal.journald_running(path)
    path.unlink()
    with datagram_server(path):
        assert journal.journald_running(path)


def test_a_flooding_guest_gets_a_bounded_share_of_the_journal(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "journal.socket"
    with datagram_server(path) as server:
        limit = journal.RateLimit(rate=2.0, burst=3, clock=lambda: now[0])
        console = journal.ConsoleJournal("s3", journal.JournalSender(path), limit)
        console.feed(b"".join(b"line %d\n" % n for n in range(10)))  # 3 go, 7 are held back
        assert console.held_back == 7
        now[0] = 1.0  # a second later: room for two more
        console.feed(b"line 10\nline 11\nline 12\n")
        console.close()
        server.setblocking(False)
        messages = []
        with pytest.raises(BlockingIOError):
            while True:
                messages.append(parse_entry(server.recv(65536))["MESSAGE"].decode())
    assert messages == [
        "line 0",
        "line 1",
        "line 2",
        "[capsa: 7 console lines not sent to the journal (rate limit); console.log has them]",
        "line 10",
        "line 11",
    ]
    assert console.held_back == 1
