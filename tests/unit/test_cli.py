"""The command line as a user meets it: one error line, exit codes, spec/env output.

No VM here: everything below fails or finishes before a VM would start.
"""

import json
from pathlib import Path

import pytest

from capsa.cli.main import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A configuration that forces TCG, so nothing probes KVM."""
    path = tmp_path / "configuration.toml"
    path.write_text('[hypervisor]\naccelerator = "tcg"\n')
    monkeypatch.setenv("CAPSA_CONFIG", str(path))
    return path


@pytest.mark.parametrize(
    ("argv", "message", "status"),
    [
        (["run"], "the following arguments are required: ID", 2),
        (["frob"], "invalid choice: 'frob'", 2),
        (["run", "a/b"], "invalid container id 'a/b'", 1),
        (["run", ".."], "invalid container id '..'", 1),
        (["--config", "/nonexistent.toml", "run", "x"], "/nonexistent.toml: configuration file does not exist", 1),
    ],
)
def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], message: str, status: int) -> None:
    code, out, err = run(capsys, *argv)
    assert code == status
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("capsa: ")
    assert message in err


def test_json_log_format_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    code, _, err = run(capsys, "--log", str(log), "--log-format", "json", "run", "a/b")
    assert code == 1
    line = json.loads(err)
    assert line["level"] == "error"
    assert "invalid container id" in line["msg"]
    # containerd's runc shim reads the last "level":"error" line of --log.
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["level"] == "error" and last["msg"] == line["msg"]


def test_missing_bundle(capsys: pytest.CaptureFixture[str], tmp_path: Path, config: Path) -> None:
    code, _, err = run(capsys, "--root", str(tmp_path / "root"), "run", "--bundle", str(tmp_path / "nope"), "c1")
    assert code == 1
    assert "no such directory" in err
    assert not (tmp_path / "root").exists()


def test_spec_writes_config_once(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(capsys, "spec", "--bundle", str(tmp_path))[0] == 0
    spec = json.loads((tmp_path / "config.json").read_text())
    assert spec["process"]["args"] == ["sh"]
    assert spec["root"] == {"path": "rootfs", "readonly": True}
    code, _, err = run(capsys, "spec", "--bundle", str(tmp_path))
    assert code == 1
    assert "exists" in err


def test_env_json_names_what_capsa_uses(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "env", "--json")
    assert code == 0
    env = json.loads(out)
    for key in ("kernel", "image", "hypervisor_path", "machine_type", "accelerator"):
        assert key in env
    assert env["accelerator"] == "tcg"
    assert env["config_file"] == str(config)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "version")
    assert code == 0
    assert out.startswith("capsa version ")


def test_list_json_is_runcs(capsys: pytest.CaptureFixture[str], tmp_path: Path, config: Path) -> None:
    from capsa.runtime.state import ContainerState, StateStore

    root = tmp_path / "root"
    code, out, _ = run(capsys, "--root", str(root), "list", "--format", "json")
    assert (code, out) == (0, "null\n")  # Go's encoding of runc's empty (nil) list
    store = StateStore(root, socket_root=tmp_path / "sockets")
    store.claim("c1")
    store.save(ContainerState(id="c1", bundle="/b", rootfs="/b/rootfs", created="2026-11-27T13:45:46.123456+00:00"))
    code, out, _ = run(capsys, "--root", str(root), "list", "--format", "json")
    assert code == 0
    [entry] = json.loads(out)
    # A UTC time as Go's RFC 3339 writes it; no shim lives, so the container is stopped with pid 0.
    assert (entry["id"], entry["created"], entry["status"], entry["pid"]) == (
        "c1",
        "2026-11-27T13:45:46.123456Z",
        "stopped",
        0,
    )
