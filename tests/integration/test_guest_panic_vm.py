"""A guest kernel panic, forced: its last console line reaches the state directory and the engine.

The container may write ``/proc/sys`` (what ``--privileged`` gives): it sets
``vm.panic_on_oom = 2`` (panic even for a cgroup's OOM, Documentation/
admin-guide/sysctl/vm.rst) and then fills its 64 MiB memory limit, so the
guest kernel panics "Out of memory: compulsory panic_on_oom is enabled".
The guest kernel has no magic SysRq (``/proc/sysrq-trigger``), and the
agent, PID 1, is out of a container's reach.
"""

from __future__ import annotations

import json

import pytest
from harness import Capsa, subreaper, wait_child

from capsa.cli.spec import default_spec

pytestmark = pytest.mark.vm

PANIC_LINE = "Kernel panic - not syncing: Out of memory: compulsory panic_on_oom is enabled"
SHOWN = f"capsa: the container's VM stopped: the guest kernel panicked; guest console: {PANIC_LINE}"


def panicking_spec(capsa: Capsa) -> None:
    command = "echo 2 > /proc/sys/vm/panic_on_oom && echo armed && exec busybox tail /dev/zero"
    spec = default_spec(["sh", "-c", command], terminal=False)
    spec["linux"]["readonlyPaths"] = [path for path in spec["linux"]["readonlyPaths"] if path != "/proc/sys"]
    spec["linux"].setdefault("resources", {})["memory"] = {"limit": 64 << 20}
    (capsa.bundle / "config.json").write_text(json.dumps(spec))


def test_run_reports_the_panic_line_on_stderr(capsa: Capsa) -> None:
    panicking_spec(capsa)
    result = capsa.run("panic1")
    assert result.code == 255  # the process's fate is unknown: its VM went away
    assert result.stdout == "armed\n"
    assert result.stderr == SHOWN + "\n"
    # run deletes: nothing is left (the capsa fixture checks processes, mounts and files).


def test_a_detached_containers_panic_stays_in_its_state_dir_until_delete(capsa: Capsa) -> None:
    panicking_spec(capsa)
    out, err = capsa.root.parent / "panic2.out", capsa.root.parent / "panic2.err"
    with subreaper(), open(out, "wb") as stdout, open(err, "wb") as stderr:
        # As an engine does: the shim keeps create's stdio (the container's), and exits with its status.
        create = capsa.popen("create", "--bundle", str(capsa.bundle), "panic2", stdout=stdout, stderr=stderr)
        assert create.wait(180) == 0, err.read_text()
        shim = capsa.state("panic2")["pid"]
        assert capsa("start", "panic2").code == 0
        assert wait_child(shim, 180) == 255
    state_dir = capsa.root / "panic2"
    try:
        # What the engine shows with the exit status: the container's stderr.
        assert err.read_text() == SHOWN + "\n"
        assert capsa.status("panic2") == "stopped"
        assert PANIC_LINE in (state_dir / "console.log").read_text()
        assert (state_dir / "vm-stopped").read_text() == SHOWN.split("stopped: ", 1)[1] + "\n"
        assert f"ERROR the VM stopped: the guest kernel panicked; guest console: {PANIC_LINE}" in (
            state_dir / "proxy.log"
        ).read_text()
    finally:
        assert capsa("delete", "panic2").code == 0
    assert not state_dir.exists()
