"""Private instances of the engines under test: Podman 4.3 (daemonless), Docker
20.10 (its own dockerd and containerd) and containerd 1.6 (its own daemon).

Each keeps its data, state and sockets under directories the test session
made, is configured for this host (no CAP_SYS_RESOURCE, hybrid cgroups: the
cgroupfs manager and ulimits that do not raise the host's), changes nothing
in the host's network (``--network none``), and on ``stop()`` ends exactly
the processes it started, unmounts what it mounted and removes its files.

Given ``netns`` (the path of a network namespace the test made), Podman and
Docker run with their default bridge networks instead, entirely inside that
namespace: the engine's processes enter it with ``nsenter --net`` (the
network namespace only: mounts stay shared with the host, so every engine
command sees the same overlay and netns mounts), so the bridge, its NAT
rules, published ports and ``docker-proxy`` live there, and the host's own
namespace gets no address, bridge or rule.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from e2e_support import Result, Runtime, kill_pids, run, session_processes, unmount_under

DOCKER = "/usr/bin/docker"  # Debian's 20.10 client; another docker on PATH may be newer
ULIMITS = ("nofile=20000:20000", "nproc=4096:4096")
IMAGE = "localhost/e2e-busybox:latest"
START_TIMEOUT = 60.0


class EngineError(AssertionError):
    """An engine could not be started: the message carries the end of its log."""


# Every directory made outside the session dir, for the session's last sweep
# (processes that name it, mounts below it) should an engine's stop() not finish.
OUTSIDE_DIRS: list[Path] = []


def _short_dir(prefix: str) -> Path:
    # Unix socket paths are limited to 107 bytes, and a runtime's state lives
    # below the engine's exec root: keep our roots as short as the defaults.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    OUTSIDE_DIRS.append(path)
    return path


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_daemon(proc: subprocess.Popen[bytes], socket: Path, log: Path, ready: list[str], what: str) -> None:
    """Wait until ``ready`` succeeds; fail with the daemon's log if it exits or hangs."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineError(f"{what} exited with {proc.returncode} while starting:\n{_tail(log)}")
        if socket.exists() and run(ready, timeout=30).code == 0:
            return
        time.sleep(0.3)
    raise EngineError(f"{what} did not answer within {START_TIMEOUT}s:\n{_tail(log)}")


def in_netns(netns: Path | None) -> list[str]:
    """The argv prefix that runs a command in the network namespace ``netns`` (and no other namespace)."""
    return [] if netns is None else ["nsenter", f"--net={netns}"]


def _stop_daemon(proc: subprocess.Popen[bytes] | None, grace: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class Podman:
    """Podman with its own storage, run root, temp dir and containers.conf."""

    name = "podman"

    def __init__(
        self, runtime: Runtime, session: Path, image_tar: Path, *, netns: Path | None = None, tag: str | None = None
    ) -> None:
        tag = tag or ("podman" if netns is None else "podman-net")
        self.runtime = runtime = runtime.tagged(tag)
        self.netns = netns
        self.dir = session / tag
        self.root = self.dir / "root"
        self.runroot = self.dir / "run"
        self.tmp = self.dir / "tmp"
        for d in (self.root, self.runroot, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "containers.conf"
        # Podman 4.3 passes no --root to the runtime (and `--runtime-flag root=`
        # is dropped from its `delete --force`), so the wrapper's private root
        # is where the runtime keeps Podman's containers.
        self.runtime_root = runtime.default_root
        names = ", ".join(f'"{n}"' for n in sorted({runtime.name, "crun", "runc"}))
        self.conf.write_text(
            "[containers]\n"
            f"default_ulimits = [{', '.join(f'{chr(34)}{u}{chr(34)}' for u in ULIMITS)}]\n"
            'log_driver = "k8s-file"\n'
            + ('netns = "none"\n' if netns is None else "")
            # With a network: an empty private CNI config dir, so Podman's
            # built-in default network ("podman", cni-podman0, 10.88.0.0/16)
            # is the one used, not whatever the host's /etc/cni/net.d holds.
            + ("" if netns is None else f'[network]\nnetwork_config_dir = "{self.dir / "cni"}"\n')
            + "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{self.dir / "events.log"}"\n'
            f'tmp_dir = "{self.tmp}"\n'
            f"runtime_supports_json = [{names}]\n"
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        self.image = IMAGE
        self("import", str(image_tar), self.image, timeout=120).check()

    @property
    def needles(self) -> list[str]:
        return [str(self.dir)]

    def argv(self, *args: str) -> list[str]:
        return [
            *in_netns(self.netns),
            "podman",
            "--root", str(self.root),
            "--runroot", str(self.runroot),
            "--storage-driver", "overlay",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            "--tmpdir", str(self.tmp),
            "--runtime", str(self.runtime.wrapper),
            *args,
        ]  # fmt: skip

    def __call__(self, *args: str, timeout: float = 120, input: str | None = None) -> Result:
        return run(self.argv(*args), timeout=timeout, input=input, env=self.env)

    def inspect(self, cid: str, template: str) -> str:
        return self("inspect", "--format", template, cid, timeout=60).check().out

    def stop(self) -> None:
        with contextlib.suppress(AssertionError):
            self("rm", "--all", "--force", "--time", "0", timeout=60)
        kill_pids([p.pid for p in session_processes(self.runtime.session, self.needles)])
        unmount_under([self.dir])
        shutil.rmtree(self.dir, ignore_errors=True)


class Containerd:
    """A containerd 1.6 with a private root, state and socket, and no CRI plugin."""

    name = "containerd"

    def __init__(self, runtime: Runtime, session: Path, namespace: str, tag: str, netns: Path | None = None) -> None:
        self.runtime = runtime = runtime.tagged(tag)
        self.namespace = namespace
        self.dir = _short_dir("c")
        self.address = self.dir / "c.sock"
        # The runc shim passes --root <runc root>/<namespace> to the runtime.
        self.runtime_root_base = self.dir / "r"
        self.runtime_root = self.runtime_root_base / namespace
        self.log = session / f"{tag}-containerd.log"
        config = self.dir / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.dir / "root"}"\n'
            f'state = "{self.dir / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            '[debug]\n  address = ""\n'
            '[metrics]\n  address = ""\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None
        # The runc shims inherit TMPDIR: their console sockets then live here too.
        (self.dir / "tmp").mkdir()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*in_netns(netns), "containerd", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "TMPDIR": str(self.dir / "tmp")},
                start_new_session=True,
            )
        try:
            _wait_daemon(self.proc, self.address, self.log, [*self.ctr_argv(), "version"], "containerd")
        except BaseException:
            self.stop()
            raise

    @property
    def needles(self) -> list[str]:
        return [str(self.dir)]

    def ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.address), "--namespace", self.namespace, *args]

    def ctr(self, *args: str, timeout: float = 120, input: str | None = None) -> Result:
        return run(self.ctr_argv(*args), timeout=timeout, input=input)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                tasks = self.ctr("tasks", "ls", "--quiet", timeout=30)
                for task in tasks.stdout.split() if tasks.code == 0 else []:
                    self.ctr("tasks", "kill", "--signal", "SIGKILL", task, timeout=30)
                    self.ctr("tasks", "delete", "--force", task, timeout=60)
                containers = self.ctr("containers", "ls", "--quiet", timeout=30)
                for container in containers.stdout.split() if containers.code == 0 else []:
                    self.ctr("containers", "delete", container, timeout=60)
        _stop_daemon(self.proc)
        # The runc shims outlive containerd by design; ours name our socket.
        kill_pids([p.pid for p in session_processes(self.runtime.session, self.needles)])
        unmount_under([self.dir])
        shutil.rmtree(self.dir, ignore_errors=True)


class Docker:
    """dockerd 20.10 with its own data root, exec root, socket and containerd."""

    name = "docker"

    def __init__(
        self, runtime: Runtime, session: Path, image_tar: Path, *, netns: Path | None = None, tag: str | None = None
    ) -> None:
        tag = tag or ("docker" if netns is None else "docker-net")
        self.runtime = runtime = runtime.tagged(tag)
        self.netns = netns
        self.containerd = Containerd(runtime, session, namespace="e2", tag=tag, netns=netns)
        self.dir = session / tag
        self.dir.mkdir(parents=True, exist_ok=True)
        # dockerd passes --root <exec root>/runtime-runc/<namespace> to every
        # runtime (20.10 names the directory after runc whatever the runtime).
        self.exec_root = _short_dir("d")
        self.runtime_root = self.exec_root / "runtime-runc" / self.containerd.namespace
        self.host = self.exec_root / "d.sock"
        self.log = session / f"{tag}d.log"
        self.runtime_name = "capsa" if runtime.capsa else "e2e-runc"
        self.proc: subprocess.Popen[bytes] | None = None
        # Without a namespace of the test's: no bridge, no iptables rules (the
        # tests use --network none); with one, docker0 and its rules live there.
        no_network = ["--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false"]
        argv = [
            *in_netns(netns),
            "dockerd",
            "--data-root", str(self.dir / "data"),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.exec_root / "dockerd.pid"),
            "-H", f"unix://{self.host}",
            "--containerd", str(self.containerd.address),
            "--containerd-namespace", self.containerd.namespace,
            "--containerd-plugins-namespace", self.containerd.namespace + "p",
            "--exec-opt", "native.cgroupdriver=cgroupfs",
            *[a for u in ULIMITS for a in ("--default-ulimit", u)],
            *(no_network if netns is None else []),
            "--storage-driver", "overlay2",
            "--add-runtime", f"{self.runtime_name}={runtime.wrapper}",
        ]  # fmt: skip
        try:
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            _wait_daemon(self.proc, self.host, self.log, self.argv("version"), "dockerd")
            self("import", str(image_tar), IMAGE, timeout=120).check()
        except BaseException:
            self.stop()
            raise
        self.image = IMAGE

    @property
    def needles(self) -> list[str]:
        return [str(self.dir), str(self.exec_root), *self.containerd.needles]

    def argv(self, *args: str) -> list[str]:
        return [DOCKER, "-H", f"unix://{self.host}", *args]

    def __call__(self, *args: str, timeout: float = 120, input: str | None = None) -> Result:
        return run(self.argv(*args), timeout=timeout, input=input)

    def inspect(self, cid: str, template: str) -> str:
        return self("inspect", "--format", template, cid, timeout=60).check().out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # A container the runtime left stuck must not keep the rest of the
            # clean-up from running: bounded, and failures only noted.
            with contextlib.suppress(AssertionError):
                ids = self("ps", "--all", "--quiet", timeout=30)
                if ids.code == 0 and ids.stdout.split():
                    self("rm", "--force", *ids.stdout.split(), timeout=60)
        _stop_daemon(self.proc)
        self.containerd.stop()
        kill_pids([p.pid for p in session_processes(self.runtime.session, self.needles)])
        unmount_under([self.dir, self.exec_root])
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.exec_root, ignore_errors=True)


#: The two engines that call the runtime binary (conftest's ``engine`` fixture runs a test under each).
Engine = Podman | Docker
