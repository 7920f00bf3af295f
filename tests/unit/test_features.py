"""`capsa features`: runc's document shape, true of capsa."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capsa.cli import features as features_verb
from capsa.cli.main import main
from capsa.runtime.hooks import STAGES


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A configuration whose QEMU and guest kernel are files of this test."""
    qemu = tmp_path / "qemu"
    qemu.write_text("#!/bin/sh\necho 'QEMU emulator version 9.9.9 (test)'\necho 'Copyright'\n")
    qemu.chmod(0o755)
    build = tmp_path / "cache" / "kernel" / "abc"
    build.mkdir(parents=True)
    (build / "vmlinux").write_bytes(b"\x7fELF")
    (build / "manifest.json").write_text(json.dumps({"kernel_release": "6.1.999-capsa"}))
    (tmp_path / "vmlinux").symlink_to(build / "vmlinux")
    path = tmp_path / "configuration.toml"
    path.write_text(f'[hypervisor]\npath = "{qemu}"\nkernel = "{tmp_path / "vmlinux"}"\naccelerator = "tcg"\n')
    monkeypatch.setenv("CAPSA_CONFIG", str(path))
    return path


def run_features(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["features"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    document: dict[str, object] = json.loads(out)
    return document


def test_document_has_what_engines_read(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    doc = run_features(capsys)
    assert doc["ociVersionMin"] == "1.0.0"
    assert doc["ociVersionMax"] == "1.0.2"
    assert doc["hooks"] == list(STAGES)
    mount_options = doc["mountOptions"]
    assert isinstance(mount_options, list)
    assert {"bind", "rbind", "ro", "rro", "nosuid", "tmpcopyup"} <= set(mount_options)
    assert "idmap" not in mount_options  # crun 1.8 has no idmapped mounts
    linux = doc["linux"]
    assert isinstance(linux, dict)
    assert linux["namespaces"] == ["cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts"]
    assert linux["capabilities"][0] == "CAP_CHOWN"
    assert linux["capabilities"][-1] == "CAP_CHECKPOINT_RESTORE"
    assert len(linux["capabilities"]) == 41
    assert linux["cgroup"] == {"v1": False, "v2": True, "systemd": False, "systemdUser": False}
    seccomp = linux["seccomp"]
    assert seccomp["enabled"] is True
    assert "SCMP_ACT_ERRNO" in seccomp["actions"] and "SCMP_ACT_NOTIFY" in seccomp["actions"]
    assert "SCMP_CMP_MASKED_EQ" in seccomp["operators"]
    assert "SCMP_ARCH_X86_64" in seccomp["archs"]
    assert linux["apparmor"] == {"enabled": False}
    assert linux["selinux"] == {"enabled": False}
    annotations = doc["annotations"]
    assert isinstance(annotations, dict)
    assert annotations["io.capsa.hooks"] == "host"
    assert annotations["io.capsa.hypervisor.qemu.version"] == "9.9.9 (test)"
    assert annotations["io.capsa.guest.kernel.release"] == "6.1.999-capsa"
    assert not any(key.startswith("org.opencontainers.runc.") for key in annotations)


def test_lists_are_sorted_and_unique() -> None:
    doc = features_verb.features()
    for values in (doc["mountOptions"], doc["linux"]["namespaces"], *doc["linux"]["seccomp"].values()):
        if isinstance(values, list):
            assert values == sorted(set(values))


def test_answers_without_a_usable_configuration(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPSA_CONFIG", str(tmp_path / "missing.toml"))
    doc = run_features(capsys)
    annotations = doc["annotations"]
    assert isinstance(annotations, dict)
    assert "io.capsa.hypervisor.qemu.version" not in annotations
    assert annotations["io.capsa.version"]


def test_missing_parts_are_left_out(tmp_path: Path) -> None:
    assert features_verb.qemu_version(tmp_path / "no-qemu") is None
    assert features_verb.kernel_release(tmp_path / "no-kernel") is None
    (tmp_path / "vmlinux").write_bytes(b"")
    (tmp_path / "manifest.json").write_text("not json")
    assert features_verb.kernel_release(tmp_path / "vmlinux") is None
