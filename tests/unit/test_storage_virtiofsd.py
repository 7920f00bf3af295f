"""virtiofsd's command line and readiness check as data; one real start of the daemon (no VM)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest

from capsa.errors import StorageError
from capsa.storage.virtiofsd import (
    DEFAULT_VIRTIOFSD,
    Virtiofsd,
    VirtiofsdConfig,
    listening_unix_sockets,
    virtiofsd_argv,
)


def test_argv_for_the_c_virtiofsd() -> None:
    config = VirtiofsdConfig(shared_dir=Path("/srv/rootfs"), socket_path=Path("/run/capsa/c1/vfs.sock"))
    assert virtiofsd_argv(config) == [
        "/usr/lib/qemu/virtiofsd",
        "--socket-path=/run/capsa/c1/vfs.sock",
        "-o",
        "source=/srv/rootfs",
        "-o",
        "cache=auto",
        "-o",
        "sandbox=namespace",
        "-o",
        "no_xattr",
        "-o",
        "announce_submounts",
        "-o",
        "modcaps=-mknod",
    ]


def test_argv_options() -> None:
    config = VirtiofsdConfig(
        shared_dir=Path("/srv/a,b\\c"),
        socket_path=Path("/s"),
        cache="always",
        xattr=True,
        sandbox="chroot",
        thread_pool_size=4,
    )
    argv = virtiofsd_argv(config)
    assert "source=/srv/a\\,b\\\\c" in argv
    assert "cache=always" in argv
    assert "sandbox=chroot" in argv
    assert "xattr" in argv
    assert argv[-1] == "--thread-pool-size=4"


def test_timeout_only_when_given() -> None:
    """The volume share's daemon gets -o timeout=0 right after the cache mode; the rootfs one keeps the default."""
    plain = virtiofsd_argv(VirtiofsdConfig(shared_dir=Path("/d"), socket_path=Path("/s")))
    assert not any(word.startswith("timeout=") for word in plain)
    argv = virtiofsd_argv(VirtiofsdConfig(shared_dir=Path("/d"), socket_path=Path("/s"), timeout=0.0))
    assert argv[argv.index("cache=auto") + 1 : argv.index("cache=auto") + 3] == ["-o", "timeout=0"]
    half = virtiofsd_argv(VirtiofsdConfig(shared_dir=Path("/d"), socket_path=Path("/s"), timeout=0.5))
    assert "timeout=0.5" in half


def test_log_next_to_the_socket_unless_given() -> None:
    assert VirtiofsdConfig(shared_dir=Path("/d"), socket_path=Path("/r/vfs.sock")).log_file == Path("/r/vfs.sock.log")
    given = VirtiofsdConfig(shared_dir=Path("/d"), socket_path=Path("/r/vfs.sock"), log_path=Path("/l"))
    assert given.log_file == Path("/l")


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"cache": "sometimes"}, "cache mode"),
        ({"sandbox": "none"}, "sandbox"),
        ({"thread_pool_size": -1}, "thread pool"),
        ({"timeout": -1.0}, "timeout"),
        ({"socket_path": Path("/" + "s" * 110)}, "107 bytes"),
    ],
)
def test_config_rejects_nonsense(overrides: dict[str, object], complaint: str) -> None:
    fields: dict[str, object] = {"shared_dir": Path("/d"), "socket_path": Path("/s"), **overrides}
    with pytest.raises(StorageError, match=complaint):
        VirtiofsdConfig(**fields)  # type: ignore[arg-type]


def test_listening_sockets_from_proc_net_unix() -> None:
    table = (
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 71527 /run/capsa/c1/vfs.sock\n"
        "0000000000000000: 00000003 00000000 00000000 0001 03 71528 /run/capsa/c1/agent.sock\n"
        "0000000000000000: 00000003 00000000 00000000 0001 03 71529\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 71530 /tmp/with space\n"
    )
    assert listening_unix_sockets(table) == {"/run/capsa/c1/vfs.sock", "/tmp/with space"}


@pytest.mark.skipif(os.geteuid() != 0 or not DEFAULT_VIRTIOFSD.exists(), reason="needs root and virtiofsd")
def test_daemon_starts_listens_and_stops() -> None:
    async def scenario(directory: Path) -> None:
        socket_path = directory / "vfs.sock"
        daemon = Virtiofsd(shared_dir=directory, socket_path=socket_path)
        await daemon.start()
        pid = daemon.pid
        assert pid is not None
        assert str(socket_path) in listening_unix_sockets(Path("/proc/net/unix").read_text())
        await daemon.stop()
        await daemon.stop()
        assert daemon.pid is None
        assert not Path(f"/proc/{pid}").exists()
        assert not socket_path.exists()

    with tempfile.TemporaryDirectory(prefix="capsa-vfs-") as directory:
        asyncio.run(scenario(Path(directory)))


def test_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    daemon = Virtiofsd(shared_dir=tmp_path / "missing", socket_path=tmp_path / "vfs.sock")
    with pytest.raises(StorageError, match="not a directory"):
        asyncio.run(daemon.start())


def test_daemon_that_exits_reports_its_status(tmp_path: Path) -> None:
    daemon = Virtiofsd(Path("/bin/false"), shared_dir=tmp_path, socket_path=tmp_path / "vfs.sock")
    with pytest.raises(StorageError, match="exited with status 1"):
        asyncio.run(daemon.start())
    assert daemon.pid is None
