"""What the engine tests share: the runtime under test behind an argv-logging
wrapper, a busybox image, bounded subprocess calls, a pty driver, and the
search for processes and mounts a test left behind.

Every process the runtime starts inherits ``CAPSA_E2E_MARK=<session dir>``
from the wrapper, so a leftover QEMU, virtiofsd, proxy or shim is found by
that marker (or by a path of the session's in its command line) and never
confused with anyone else's process on the host.  The engines run at their
default paths, where other containers may live: what the session made is
known by the wrapper's log (every ``create`` names its root and ID), and
only that is looked at, or removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import pty
import select
import shlex
import shutil
import signal
import struct
import subprocess
import tarfile
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
CAPSA = Path("/usr/local/bin/capsa")
MARK_VAR = "CAPSA_E2E_MARK"
SHIM_NAME = "containerd-shim-capsa-v2"
# The runtimes' own default state roots (what an engine that passes no --root gets).
CAPSA_DEFAULT_ROOT = Path("/run/capsa")
RUNC_DEFAULT_ROOT = Path("/run/runc")
# Where capsa keeps each container's sockets (``/run/capsa-vm/<hash of the state dir>/``,
# ``capsa.runtime.state.StateStore.socket_dir``), whatever the root and ID.
SOCKET_ROOT = Path("/run/capsa-vm")
# Processes that stand for a container on the host, by runtime: what must not
# outlive the container, and what "kill -9 the VM" means.
VM_PROCESS_NAMES = ("qemu-system",)
RUNTIME_PROCESS_WORDS = ("qemu-system", "virtiofsd", "capsa", "runc")


#: The example agent policies (config/policies).
POLICIES = Path(__file__).parents[2] / "config" / "policies"


def policy_annotation(name: str) -> str:
    """``io.capsa.agent.policy=<base64>`` for the example policy ``name`` (an engine's --annotation)."""
    import base64

    from capsa.proxy.proxy import POLICY_ANNOTATION

    return f"{POLICY_ANNOTATION}={base64.b64encode((POLICIES / f'{name}.toml').read_bytes()).decode()}"


def runtime_binary() -> Path:
    """The runtime under test: ``CAPSA_E2E_RUNTIME`` (a path or ``runc``), else capsa."""
    chosen = os.environ.get("CAPSA_E2E_RUNTIME", str(CAPSA))
    found = shutil.which(chosen)
    return Path(found) if found else Path(chosen)


def is_capsa(binary: Path) -> bool:
    return binary.resolve().name == "capsa" or binary.name == "capsa"


def capsa_shim() -> Path | None:
    """The capsa shim v2 binary: ``CAPSA_E2E_SHIM``, else the script next to
    this Python (the venv's), else one on PATH; None when there is none."""
    import sys

    chosen = os.environ.get("CAPSA_E2E_SHIM")
    candidates = [Path(chosen)] if chosen else [Path(sys.executable).parent / SHIM_NAME]
    if not chosen and (found := shutil.which(SHIM_NAME)):
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.exists() and os.access(candidate, os.X_OK):
            return candidate
    return None


def skip_or_fail(reason: str) -> None:
    """Skip, but fail under CI, where a missing part (or a host already running
    an engine the tests need to own) is a broken setup, not a reason to pass."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Result:
    argv: list[str]
    code: int
    stdout: str
    stderr: str

    def check(self) -> Result:
        assert self.code == 0, f"{' '.join(self.argv)} exited {self.code}: {self.stderr.strip()[-2000:]}"
        return self

    @property
    def out(self) -> str:
        return self.stdout.strip()


def run(
    argv: list[str],
    *,
    input: str | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> Result:
    """Run one command to its end, bounded by ``timeout``.

    stdout and stderr go to files, not pipes: a detached container keeps the
    stdio it was given, and must not keep us waiting for EOF.
    """
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            start_new_session=True,
        )
        try:
            proc.communicate(input.encode() if input is not None else None, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            out.seek(0)
            err.seek(0)
            raise AssertionError(
                f"timed out after {timeout}s: {' '.join(argv)}\nstdout: {out.read()[-2000:]!r}\n"
                f"stderr: {err.read()[-2000:]!r}"
            ) from None
        out.seek(0)
        err.seek(0)
        return Result(argv, proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"))


@dataclass
class PtyResult:
    code: int
    output: str


def run_in_pty(
    argv: list[str],
    *,
    rows: int = 33,
    cols: int = 101,
    send: list[tuple[str, str]] | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> PtyResult:
    """Run ``argv`` on a fresh pty of the given size, as a person at a terminal would.

    ``send`` is a list of (wait_for, text): once ``wait_for`` has appeared in the
    output, ``text`` is typed.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True, close_fds=True
    )
    os.close(slave)
    pending = list(send or [])
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s: {' '.join(argv)}\noutput: {output[-2000:]!r}")
            ready, _, _ = select.select([master], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    chunk = b""
                if not chunk:
                    break
                output += chunk
            while pending and pending[0][0].encode() in output:
                os.write(master, pending.pop(0)[1].encode())
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    return PtyResult(code, output.decode(errors="replace"))


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if callable(predicate) and predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- the runtime under test ---------------------------------------------------------------------


@dataclass
class Runtime:
    """The runtime binary behind a wrapper script the engines are pointed at.

    The wrapper appends every invocation's argv to ``argv.log`` (so the report
    can say what each engine passes, and the session knows every container it
    created: root and ID), exports the session marker, and otherwise passes
    the argv on untouched: an engine that passes no ``--root`` (Podman 4.3)
    gets the runtime's own default root, as it would on a user's host.
    """

    binary: Path
    session: Path
    tag: str = "cli"
    #: Exported by the wrapper to the runtime (e.g. ``CAPSA_CONFIG``: the
    #: engines do not pass their own environment on).
    env: dict[str, str] = field(default_factory=dict)
    wrapper: Path = field(init=False)
    argv_log: Path = field(init=False)
    specs: Path = field(init=False)

    def __post_init__(self) -> None:
        bindir = self.session / f"bin-{self.tag}"
        bindir.mkdir(parents=True, exist_ok=True)
        # Named like the runtime: Podman calls a runtime by its file name, and
        # conmon gets --log-format json only for names in runtime_supports_json.
        self.wrapper = bindir / self.binary.name
        self.argv_log = self.session / "argv.log"
        self.specs = self.session / "specs" / self.tag
        self.wrapper.write_text(
            "#!/bin/sh\n"
            "# e2e: log the argv, mark every process the runtime starts\n"
            f'printf "%s %s\\n" {self.tag} "$*" >> {self.argv_log}\n'
            f"export {MARK_VAR}={self.session}\n"
            + "".join(f"export {key}={shlex.quote(value)}\n" for key, value in sorted(self.env.items()))
            + "# keep each spec an engine hands to create, for the report\n"
            f"mkdir -p {self.specs}; b=; n=; for a; do\n"
            '  [ "$n" = 1 ] && b=$a; n=; case $a in --bundle|-b) n=1;; --bundle=*) b=${a#--bundle=};; esac\n'
            "done\n"
            f'[ -n "$b" ] && [ -f "$b/config.json" ] && cp "$b/config.json" "{self.specs}/$(date +%s%N).json"\n'
            f'exec {self.binary} "$@"\n'
        )
        self.wrapper.chmod(0o755)

    def tagged(self, tag: str) -> Runtime:
        """The same runtime behind a wrapper whose log lines say ``tag`` (the
        engines clear their environment, so the wrapper's name is what tells)."""
        return Runtime(self.binary, self.session, tag, dict(self.env))

    @property
    def capsa(self) -> bool:
        return is_capsa(self.binary)

    @property
    def name(self) -> str:
        return self.binary.name

    @property
    def default_root(self) -> Path:
        """The root the runtime uses when it is given none (Podman passes none)."""
        return CAPSA_DEFAULT_ROOT if self.capsa else RUNC_DEFAULT_ROOT

    def __call__(self, root: Path, *args: str, timeout: float = 120, input: str | None = None) -> Result:
        return run([str(self.wrapper), "--root", str(root), *args], timeout=timeout, input=input)

    def listed(self, root: Path) -> list[str]:
        """Container IDs ``<runtime> --root ROOT list`` shows."""
        if not root.exists():
            return []
        result = self(root, "list", "--format", "json", timeout=60).check()
        entries = json.loads(result.stdout or "null") or []
        return [e["id"] for e in entries]

    def created(self) -> list[tuple[Path, str]]:
        """Every (root, ID) a ``create`` of this session named, through any
        wrapper, in order (the root as the engine spelled it)."""
        found: list[tuple[Path, str]] = []
        try:
            lines = self.argv_log.read_text(errors="replace").splitlines()
        except OSError:
            return found
        for line in lines:
            words = line.split()[1:]
            if "create" not in words or len(words) < 2:
                continue
            at = words.index("create")
            root = self.default_root
            for i, word in enumerate(words[:at]):
                if word == "--root" and i + 1 < at:
                    root = Path(words[i + 1])
                elif word.startswith("--root="):
                    root = Path(word.split("=", 1)[1])
            if (root, words[-1]) not in found:
                found.append((root, words[-1]))
        return found

    def created_in(self, root: Path) -> list[str]:
        """The IDs this session created under ``root``."""
        return [cid for r, cid in self.created() if os.path.abspath(r) == os.path.abspath(root)]


def expected_kernel_release(runtime: Runtime) -> str:
    """What ``uname -r`` prints in a container: the guest kernel's release under
    capsa (read from the kernel file itself), the host's under runc."""
    if not runtime.capsa:
        return os.uname().release
    from capsa.config import load_config

    kernel = load_config().hypervisor.kernel
    data = Path(kernel).read_bytes()
    at = data.find(b"Linux version ")
    if at < 0:
        # A bzImage: the header's kernel_version pointer (boot protocol 2.00+, offset 0x20e).
        (offset,) = struct.unpack_from("<H", data, 0x20E)
        return data[offset + 0x200 :].split(b" ", 1)[0].decode()
    return data[at + len(b"Linux version ") :].split(b" ", 1)[0].decode()


# -- images ------------------------------------------------------------------------------------


def make_rootfs(rootfs: Path) -> None:
    """A busybox root: the static binary and a link for each of its applets."""
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, timeout=30, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            os.symlink("busybox", rootfs / "bin" / applet)
    for d in ("proc", "sys", "dev", "tmp", "etc", "run", "root"):
        (rootfs / d).mkdir()
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")


def make_rootfs_tar(rootfs: Path, tar: Path) -> None:
    with tarfile.open(tar, "w") as t:
        for entry in sorted(rootfs.iterdir()):
            t.add(entry, arcname=entry.name)


def make_oci_archive(
    rootfs_tar: Path, archive: Path, ref: str, *, entrypoint: list[str] | None = None, cmd: list[str] | None = None
) -> None:
    """An OCI image layout (image-spec v1.0, ``image-layout.md``) in a tar, for
    ``ctr images import``: one uncompressed layer, a config, a manifest, and
    an index naming the manifest ``ref``. The config's ``Cmd`` is ``sh``
    unless ``cmd`` says otherwise; ``entrypoint`` sets ``Entrypoint``."""
    import hashlib

    def blob(data: bytes) -> tuple[str, int, bytes]:
        return "sha256:" + hashlib.sha256(data).hexdigest(), len(data), data

    layer = rootfs_tar.read_bytes()
    layer_digest, layer_size, _ = blob(layer)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["sh"] if cmd is None else cmd,
                **({"Entrypoint": entrypoint} if entrypoint is not None else {}),
            },
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    ).encode()
    config_digest, config_size, _ = blob(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}
            ],
        }
    ).encode()
    manifest_digest, manifest_size, _ = blob(manifest)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": manifest_size,
                    "annotations": {"org.opencontainers.image.ref.name": ref, "io.containerd.image.name": ref},
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        }
    ).encode()
    import io

    with tarfile.open(archive, "w") as t:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", index)
        for digest, data in ((layer_digest, layer), (config_digest, config), (manifest_digest, manifest)):
            add("blobs/sha256/" + digest.split(":", 1)[1], data)


# -- processes and mounts ----------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    cmdline: str
    marked: bool
    #: Its name (``comm``: what prctl(PR_SET_NAME) set, e.g. capsa's ``capsa-vmm``).
    name: str = ""

    def __str__(self) -> str:
        return f"{self.pid} (parent {self.ppid}){' [marked]' if self.marked else ''}: {self.cmdline[:300]}"


def processes(session: Path) -> list[Proc]:
    """Every live user-space process, marked when it carries this session's marker."""
    mark = f"{MARK_VAR}={session}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if not raw:
            continue  # a zombie or a kernel thread
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        name = stat.split("(", 1)[1].rsplit(")", 1)[0]
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        found.append(Proc(int(entry), ppid, cmdline, mark in environ.split(b"\0"), name))
    return found


def session_processes(session: Path, needles: list[str]) -> list[Proc]:
    """Every live process the session started or that names one of its paths."""
    me = os.getpid()
    return [p for p in processes(session) if p.pid != me and (p.marked or any(n in p.cmdline for n in needles))]


ENGINE_PROCESS_WORDS = ("conmon", "containerd", "dockerd", "podman")


def is_engine(proc: Proc) -> bool:
    """An engine's own process (daemon, CLI or per-container monitor such as conmon or a
    containerd shim), as opposed to the runtime's: by the name it was started as."""
    return any(engine in proc.cmdline.split(" ", 1)[0] for engine in ENGINE_PROCESS_WORDS)


def runtime_leftovers(session: Path, needles: list[str], words: tuple[str, ...] = RUNTIME_PROCESS_WORDS) -> list[Proc]:
    """The runtime's own processes (CLI, proxy, shim, QEMU, virtiofsd) still alive."""
    return [
        p
        for p in session_processes(session, needles)
        if (p.marked or any(w in p.cmdline for w in words)) and not is_engine(p)
    ]


def kill_pids(pids: list[int], grace: float = 5.0) -> None:
    """TERM, then KILL, exactly these processes."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            if not _zombie(pid):
                os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def mounts_under(paths: list[Path]) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].encode().decode("unicode_escape")
        if any(target == str(p) or target.startswith(str(p) + "/") for p in paths):
            found.append(target)
    return found


_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


def unmount_under(paths: list[Path], keep: frozenset[str] | set[str] = frozenset()) -> None:
    """Detach every mount below ``paths`` but those in ``keep`` (the mounts that
    were there before the session's engine started), deepest (latest) first."""
    for _ in range(5):
        targets = [t for t in mounts_under(paths) if t not in keep]
        if not targets:
            return
        for target in reversed(targets):
            _libc.umount2(target.encode(), MNT_DETACH)


# -- capsa's socket directories ----------------------------------------------------------------


def socket_dir(root: Path, container_id: str) -> Path | None:
    """Where capsa keeps the sockets of container ``container_id`` of state root
    ``root`` (as the runtime derives it); None for an ID it would refuse."""
    from capsa.errors import CapsaError
    from capsa.runtime.state import StateStore

    try:
        return StateStore(root, SOCKET_ROOT).socket_dir(container_id)
    except (CapsaError, ValueError):
        return None


def socket_dirs() -> set[str]:
    """The names in /run/capsa-vm now."""
    try:
        return set(os.listdir(SOCKET_ROOT))
    except OSError:
        return set()


def new_socket_dirs(session: Path, before: set[str], roots: list[Path]) -> list[str]:
    """The socket directories made since ``before`` that are the session's: those
    whose ``state`` link (where capsa leaves one) names a state directory below
    one of ``roots``, and those without one that no live process of someone
    else's (another capsa user of this host, not marked) names."""
    made = socket_dirs() - before
    if not made:
        return []
    ours = {os.path.realpath(r) for r in roots}
    others = " ".join(p.cmdline for p in processes(session) if not p.marked and str(SOCKET_ROOT) in p.cmdline)
    found = []
    for name in sorted(made):
        try:
            state = os.readlink(SOCKET_ROOT / name / "state")
        except OSError:
            state = ""
        if (os.path.dirname(os.path.realpath(state)) in ours) if state else name not in others:
            found.append(str(SOCKET_ROOT / name))
    return found


def vm_process(runtime: Runtime, session: Path, container_id: str, container_pid: int) -> int:
    """The host process whose death is the VM's death: QEMU under capsa (found by
    the session marker and the container ID in its command line); the
    container's own init under runc, where there is no VM."""
    if not runtime.capsa:
        return container_pid
    # QEMU itself (by the program it runs), not a helper that names it (capsa's jail keeper, capsa-vmm).
    qemus = [p for p in session_processes(session, []) if p.marked and "qemu-system" in p.cmdline.split(" ", 1)[0]]
    mine = [p for p in qemus if container_id in p.cmdline]
    chosen = mine or (qemus if len(qemus) == 1 else [])
    assert len(chosen) == 1, f"cannot tell the QEMU of {container_id} among: {[str(p) for p in qemus]}"
    return chosen[0].pid


def assert_nothing_left(runtime: Runtime, root: Path, needles: list[str], engine_words: tuple[str, ...] = ()) -> None:
    """``<runtime> --root ROOT list`` shows none of the containers this session
    created there, capsa left none of their socket directories, and no process
    of the runtime (nor of the engine's per-container monitors, e.g. conmon or
    containerd's runc shim) that belongs to this session is alive; waits a
    little for exits already under way."""
    session = runtime.session

    def left() -> list[str]:
        created = runtime.created_in(root)
        found = [f"listed: {cid}" for cid in runtime.listed(root) if cid in created]
        if runtime.capsa:
            dirs = [(cid, socket_dir(root, cid)) for cid in created]
            found += [f"socket directory {d} (of {cid})" for cid, d in dirs if d is not None and d.exists()]
        found += [f"process {p}" for p in runtime_leftovers(session, needles)]
        found += [
            f"monitor {p}"
            for p in session_processes(session, needles)
            if any(w in p.cmdline.split(" ", 1)[0] for w in engine_words)
        ]
        return found

    deadline = time.monotonic() + 20
    while (found := left()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert found == [], "left behind:\n" + "\n".join(found)


def runtime_pids(session: Path) -> set[int]:
    """The runtime's processes alive now (by the session marker; not the engines')."""
    return {p.pid for p in session_processes(session, []) if p.marked and not is_engine(p)}


def sweep_created(runtime: Runtime) -> None:
    """The session's last resort: ``delete --force`` every container it created
    that the runtime still lists, and remove what capsa left of their socket
    directories (whatever root each engine chose)."""
    created = runtime.created()
    for root in {r for r, _ in created}:
        try:
            listed = set(runtime.listed(root))
        except (AssertionError, ValueError, KeyError, TypeError):
            listed = set()
        for r, cid in created:
            if r == root and cid in listed:
                with contextlib.suppress(AssertionError):
                    runtime(root, "delete", "--force", cid, timeout=120)
    if runtime.capsa:
        for root, cid in created:
            if (d := socket_dir(root, cid)) is not None:
                shutil.rmtree(d, ignore_errors=True)


def end_runtime_processes(session: Path, since: set[int]) -> None:
    """After a failed test: end the runtime's processes that were not alive in
    ``since`` (those the test made), so an engine stuck waiting on one of them
    can clean up."""
    kill_pids(sorted(runtime_pids(session) - since), grace=2)
