"""Docker at its default configuration (issue 12): a dockerd whose ``daemon.json``
only adds the runtime (``{"runtimes": {"capsa": {"path": ...}}}``) and what this
host needs, every path at its default, on the system containerd.

dockerd then calls the runtime with ``--root /var/run/docker/runtime-runc/moby``
and a 64-hex container ID: a state directory whose ``proxy.sock`` would be 105
bytes and whose VM sockets would not fit a unix socket's 107 (every ``docker
run`` failed while capsa kept its sockets below the state directory).  What a
user does: ``docker run --rm --runtime capsa IMAGE uname -r`` prints the
guest's kernel, ``-i`` passes stdin through, ``-d`` then ``exec`` then
``stop``; and a dockerd started with ``"default-runtime": "capsa"`` runs a
plain ``docker run --rm IMAGE uname -r`` in a VM.  Nothing is left behind: no
process of the runtime, no socket directory in ``/run/capsa-vm``.

Each test starts its own default dockerd (and containerd), so the module's
two configurations never meet; under runc (``CAPSA_E2E_RUNTIME=runc``) the
same tests pass with the host's kernel.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
from e2e_confinement import assert_qemus_confined
from e2e_engines import DOCKER_RUNTIME_ROOT, Docker, claim_default
from e2e_support import (
    Runtime,
    assert_nothing_left,
    expected_kernel_release,
    new_socket_dirs,
    socket_dirs,
)

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.slow]

SUN_PATH_MAX = 107  # unix(7): sun_path holds 108 bytes, the last one a NUL
TRAP_LOOP = 'trap "exit 42" TERM; while :; do sleep 1; done'


@pytest.fixture
def dirs_before() -> set[str]:
    """The socket directories in /run/capsa-vm before the test (someone else's)."""
    return socket_dirs()


def start_docker(runtime: Runtime, session_dir: Path, image_tar: Path, *, default_runtime: bool) -> Docker:
    tag = "docker-default-runtime" if default_runtime else "docker-default"
    return Docker(runtime, session_dir, image_tar, tag=tag, default_runtime=default_runtime)


def calls(docker: Docker, verb: str) -> list[list[str]]:
    """Every ``verb`` this dockerd's wrapper logged, as argv lists."""
    lines = docker.runtime.argv_log.read_text().splitlines()
    return [line.split()[1:] for line in lines if line.startswith(f"{docker.runtime.tag} ") and verb in line.split()]


def assert_default_layout(docker: Docker) -> None:
    """The runtime was called as Docker calls it at its defaults: the default
    runtime root, a 64-hex ID, and a state directory too deep for sockets."""
    creates = calls(docker, "create")
    assert creates, "dockerd did not call the runtime's create"
    for argv in creates:
        assert argv[argv.index("--root") + 1] == str(DOCKER_RUNTIME_ROOT), argv
        assert re.fullmatch(r"[0-9a-f]{64}", argv[-1]), argv
        # Not even a socket named agent.sock would fit in that state directory.
        assert len(f"{DOCKER_RUNTIME_ROOT}/{argv[-1]}/agent.sock") > SUN_PATH_MAX


def assert_clean(docker: Docker, runtime: Runtime, before: set[str]) -> None:
    assert docker("ps", "--all", "--quiet", "--filter", f"label={docker.label}").check().out == ""
    assert_nothing_left(docker.runtime, docker.runtime_root, docker.needles, engine_words=("containerd-shim",))
    assert new_socket_dirs(runtime.session, before, [docker.runtime_root]) == [], "left in /run/capsa-vm"


def test_runtime_added_to_a_default_dockerd(
    runtime: Runtime, session_dir: Path, image_tar: Path, dirs_before: set[str]
) -> None:
    docker = start_docker(runtime, session_dir, image_tar, default_runtime=False)
    try:
        kernel = expected_kernel_release(runtime)
        name = docker.runtime_name
        result = docker("run", "--rm", "--runtime", name, docker.image, "uname", "-r").check()
        assert result.out == kernel
        assert (result.out != os.uname().release) == runtime.capsa, "the container ran on the host's kernel"

        text = "".join(f"line {i}\n" for i in range(5000))
        piped = docker("run", "--rm", "-i", "--runtime", name, docker.image, "sh", "-c", "cat; echo done", input=text)
        assert piped.check().stdout == text + "done\n"

        cid = docker("run", "-d", "--runtime", name, docker.image, "sh", "-c", TRAP_LOOP).check().out
        try:
            if runtime.capsa:
                assert_qemus_confined(runtime.session)  # issue 13: the host side, under Docker
            execd = docker("exec", cid, "sh", "-c", "echo from exec; uname -r").check()
            assert execd.stdout == f"from exec\n{kernel}\n"
            docker("stop", "--time", "20", cid).check()
            assert docker.inspect(cid, "{{.State.ExitCode}}") == "42"
        finally:
            docker("rm", "--force", cid, timeout=120)
        assert_default_layout(docker)
        assert_clean(docker, runtime, dirs_before)
    finally:
        docker.stop()


def test_default_runtime(runtime: Runtime, session_dir: Path, image_tar: Path, dirs_before: set[str]) -> None:
    """``"default-runtime": "capsa"``: a plain ``docker run`` (no ``--runtime``) runs in a VM."""
    docker = start_docker(runtime, session_dir, image_tar, default_runtime=True)
    try:
        assert docker("info", "--format", "{{.DefaultRuntime}}").check().out == docker.runtime_name
        result = docker("run", "--rm", docker.image, "uname", "-r").check()
        assert result.out == expected_kernel_release(runtime)
        assert (result.out != os.uname().release) == runtime.capsa, "the container ran on the host's kernel"
        assert_default_layout(docker)
        assert_clean(docker, runtime, dirs_before)
    finally:
        docker.stop()


def test_an_engine_already_serving_its_default_socket_is_not_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session owns each engine's default instance or does not run: a socket
    someone else serves makes the engine refuse to start (a skip; a failure under CI)."""
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        monkeypatch.delenv("CI", raising=False)
        with pytest.raises(pytest.skip.Exception, match="already serves"):
            claim_default(path, "dockerd")
        monkeypatch.setenv("CI", "1")
        with pytest.raises(pytest.fail.Exception, match="already serves"):
            claim_default(path, "dockerd")
    claim_default(path, "dockerd")  # nobody listens any more: free to start
