"""virtiofsd: the host daemon that serves one directory to one VM over virtio-fs.

Debian's QEMU 7.2 ships the C virtiofsd (``/usr/lib/qemu/virtiofsd``).  It
listens on a vhost-user unix socket, accepts exactly one connection (QEMU's
``vhost-user-fs`` device), sandboxes itself (mount, PID and network
namespaces, ``pivot_root`` into the shared directory) and exits when QEMU
hangs up.  DESIGN.md, decision 6: the engine's rootfs is shared this way, not
copied.

Readiness is judged from ``/proc/net/unix`` (the socket in the listening
state), never by connecting: the daemon would take a test connection for
its one VMM and exit when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from capsa.errors import StorageError
from capsa.hypervisor.process import Helper, last_line, spawn, terminate

DEFAULT_VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
CACHE_MODES = ("auto", "always", "none")
SANDBOX_MODES = ("namespace", "chroot")
DEFAULT_READY_TIMEOUT = 5.0

# /proc/net/unix "Flags" column: __SO_ACCEPTCON (include/linux/net.h), set
# on a socket that listen()ed.
_SO_ACCEPTCON = 0x10000


def _fuse_option_value(value: str | Path) -> str:
    """Escape a value inside a ``-o a=b,c=d`` FUSE option string (libfuse fuse_opt: backslash quotes)."""
    return str(value).replace("\\", "\\\\").replace(",", "\\,")


@dataclass(frozen=True, kw_only=True)
class VirtiofsdConfig:
    """One virtiofsd instance: which directory, on which socket, how."""

    path: Path = DEFAULT_VIRTIOFSD
    shared_dir: Path
    socket_path: Path
    #: FUSE cache mode: ``auto`` (close-to-open consistency with the host),
    #: ``always`` (fastest, for trees only the guest changes), ``none``.
    cache: str = "auto"
    #: Seconds the guest may keep entries and attributes (``-o timeout=``);
    #: None keeps the cache mode's own (1 s for ``auto``).  0 with ``auto``:
    #: every lookup and getattr asks the host, so host changes are seen at
    #: once while file data still goes through the guest's page cache, which
    #: is what mmap(MAP_SHARED) needs (bind volumes, see capsa.config).
    timeout: float | None = None
    #: Extended attributes (file capabilities, SELinux labels) passed through.
    xattr: bool = False
    #: ``namespace`` isolates the daemon in its own mount/PID/net namespaces;
    #: ``chroot`` for when capsa itself runs in a container that forbids them.
    sandbox: str = "namespace"
    #: Worker threads; None keeps virtiofsd's default (requests are served by
    #: the virtqueue thread itself, lowest latency for one guest).
    thread_pool_size: int | None = None
    #: Where its stderr goes; defaults to ``<socket>.log``.
    log_path: Path | None = None

    def __post_init__(self) -> None:
        if self.cache not in CACHE_MODES:
            raise StorageError(f"virtiofsd cache mode must be one of {', '.join(CACHE_MODES)}, not {self.cache!r}")
        if self.sandbox not in SANDBOX_MODES:
            raise StorageError(f"virtiofsd sandbox must be one of {', '.join(SANDBOX_MODES)}, not {self.sandbox!r}")
        if self.timeout is not None and not 0 <= self.timeout < float("inf"):
            raise StorageError(f"virtiofsd timeout must be a number of seconds >= 0, not {self.timeout}")
        if self.thread_pool_size is not None and self.thread_pool_size < 0:
            raise StorageError(f"virtiofsd thread pool size must be >= 0, not {self.thread_pool_size}")
        if len(os.fsencode(self.socket_path)) > 107:
            # sockaddr_un.sun_path is 108 bytes with its terminating NUL (unix(7)).
            raise StorageError(f"virtiofsd socket path {self.socket_path} is longer than 107 bytes")

    @property
    def log_file(self) -> Path:
        return self.log_path or self.socket_path.with_name(self.socket_path.name + ".log")


def virtiofsd_argv(config: VirtiofsdConfig) -> list[str]:
    """The command line of the C virtiofsd from QEMU 7.2 (see its ``--help``)."""
    argv = [
        str(config.path),
        f"--socket-path={config.socket_path}",
        "-o",
        f"source={_fuse_option_value(config.shared_dir)}",
        "-o",
        f"cache={config.cache}",
        *(["-o", f"timeout={config.timeout:g}"] if config.timeout is not None else []),
        "-o",
        f"sandbox={config.sandbox}",
        "-o",
        "xattr" if config.xattr else "no_xattr",
        # Submounts under the shared tree (volumes) show up as separate
        # mounts in the guest, with their own st_dev, instead of inode clashes.
        "-o",
        "announce_submounts",
        # Of its default capabilities (chown, dac_override, fowner, fsetid,
        # setgid, setuid, mknod, setfcap) it keeps all but mknod: a guest
        # must not make a device node on the host, where virtiofsd would
        # open the host's device for it.  FIFOs and sockets need no capability.
        "-o",
        "modcaps=-mknod",
    ]
    if config.thread_pool_size is not None:
        argv.append(f"--thread-pool-size={config.thread_pool_size}")
    return argv


def _no_core_dumps(then: Callable[[], None] | None) -> Callable[[], None]:
    """virtiofsd's ``preexec_fn``: no core dump (it would hold guest file data), then ``then``."""

    def hook() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if then is not None:
            then()

    return hook


def listening_unix_sockets(proc_net_unix: str) -> set[str]:
    """Paths of the listening unix sockets in a ``/proc/net/unix`` dump.

    Columns: ``Num RefCount Protocol Flags Type St Inode Path`` (net/unix/af_unix.c,
    unix_seq_show); the path is absent for unnamed sockets.
    """
    paths: set[str] = set()
    for line in proc_net_unix.splitlines()[1:]:
        fields = line.split(None, 7)
        if len(fields) == 8 and int(fields[3], 16) & _SO_ACCEPTCON:
            paths.add(fields[7])
    return paths


class Virtiofsd:
    """One running virtiofsd, from start until it is reaped.

    ``die_with_parent`` ties its life to this process (PR_SET_PDEATHSIG).
    """

    def __init__(
        self,
        path: Path = DEFAULT_VIRTIOFSD,
        *,
        shared_dir: Path,
        socket_path: Path,
        cache: str = "auto",
        timeout: float | None = None,
        xattr: bool = False,
        sandbox: str = "namespace",
        thread_pool_size: int | None = None,
        log_path: Path | None = None,
        die_with_parent: bool = False,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
    ) -> None:
        self.config = VirtiofsdConfig(
            path=path,
            shared_dir=shared_dir,
            socket_path=socket_path,
            cache=cache,
            timeout=timeout,
            xattr=xattr,
            sandbox=sandbox,
            thread_pool_size=thread_pool_size,
            log_path=log_path,
        )
        self._die_with_parent = die_with_parent
        self._ready_timeout = ready_timeout
        self._helper: Helper | None = None

    @property
    def _proc(self) -> asyncio.subprocess.Process | None:
        return self._helper.proc if self._helper is not None else None

    @property
    def pid(self) -> int | None:
        if self._proc is None or self._proc.returncode is not None:
            return None
        return self._proc.pid

    @property
    def socket_path(self) -> Path:
        return self.config.socket_path

    async def start(self) -> None:
        """Start the daemon; return once its socket accepts QEMU's connection."""
        if self._proc is not None:
            raise StorageError(f"virtiofsd for {self.config.shared_dir} was already started")
        config = self.config
        if not config.shared_dir.is_dir():
            raise StorageError(f"cannot share {config.shared_dir} over virtio-fs: not a directory")
        # A stale socket file from an earlier run would look ready before
        # the new daemon listens; virtiofsd replaces it anyway.
        with contextlib.suppress(FileNotFoundError):
            config.socket_path.unlink()
        self._helper = await spawn(
            virtiofsd_argv(config),
            log_path=config.log_file,
            error=StorageError,
            die_with_parent=self._die_with_parent,
            confine=_no_core_dumps,
        )
        try:
            await self._wait_listening()
        except BaseException:
            await self.stop(timeout=0)
            raise

    async def _wait_listening(self) -> None:
        proc = self._proc
        assert proc is not None
        wanted = str(self.config.socket_path)
        deadline = time.monotonic() + self._ready_timeout
        delay = 0.002
        while True:
            if proc.returncode is not None:
                assert self._helper is not None
                await self._helper.output_closed()
                said = last_line(self.config.log_file)
                raise StorageError(
                    f"virtiofsd for {self.config.shared_dir} exited with status {proc.returncode}"
                    + (f": {said}" if said else "")
                )
            try:
                table = Path("/proc/net/unix").read_text()
            except OSError as exc:
                raise StorageError(f"cannot read /proc/net/unix to see virtiofsd listen: {exc.strerror}") from exc
            if wanted in listening_unix_sockets(table):
                return
            if time.monotonic() > deadline:
                raise StorageError(
                    f"virtiofsd for {self.config.shared_dir} did not listen on {wanted} "
                    f"within {self._ready_timeout:g} s"
                )
            # The daemon usually listens within a few milliseconds.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def stop(self, timeout: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; reap; remove the socket.

        Safe when the daemon already exited (it does when QEMU disconnects),
        before :meth:`start`, and twice.
        """
        if self._helper is not None:
            await terminate(self._helper.proc, timeout)
            await self._helper.output_closed()
        # virtiofsd does not remove its socket when it is signalled.
        with contextlib.suppress(OSError):
            self.config.socket_path.unlink(missing_ok=True)

    async def wait(self) -> int:
        if self._proc is None:
            raise StorageError("virtiofsd was not started")
        return await self._proc.wait()
