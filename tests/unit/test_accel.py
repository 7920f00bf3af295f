"""The accelerator choice: cache key, cache reuse, probe reading, forced verdicts. No VM boots here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from capsa.config import Config, HypervisorConfig
from capsa.errors import HypervisorError
from capsa.hypervisor import accel
from capsa.hypervisor.accel import (
    AccelVerdict,
    cache_document,
    cached_verdict,
    kvm_unusable_reason,
    probe_accelerator,
    probe_argv,
    probe_key,
    read_cache,
    resolve_accelerator,
    verdict_from_probe,
)

BANNER = b"[    0.000000] Linux version 6.1.0 (gcc) #1 SMP\n"
PANIC = b"[    0.310000] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n"


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    qemu = tmp_path / "qemu"
    kernel = tmp_path / "vmlinux"
    qemu.write_bytes(b"qemu")
    kernel.write_bytes(b"kernel")
    return qemu, kernel


@pytest.fixture
def kvm_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_unusable_reason", lambda device=accel.KVM_DEVICE: None)


def no_probe(*args: object, **kwargs: object) -> AccelVerdict:
    raise AssertionError("the probe ran although the verdict was cached")


def test_key_names_host_boot_qemu_and_kernel(files: tuple[Path, Path]) -> None:
    qemu, kernel = files
    key = probe_key(qemu, kernel)
    assert key["host_kernel"] == os.uname().release
    assert key["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert key["hypervisor"]["path"] == str(qemu)
    assert key["hypervisor"]["size"] == 4
    assert key["guest_kernel"]["path"] == str(kernel)
    assert json.loads(json.dumps(key)) == key


def test_key_changes_when_qemu_or_kernel_change(files: tuple[Path, Path]) -> None:
    qemu, kernel = files
    key = probe_key(qemu, kernel)
    kernel.write_bytes(b"a rebuilt kernel")
    assert probe_key(qemu, kernel) != key
    key = probe_key(qemu, kernel)
    os.utime(qemu, ns=(1, 1))
    assert probe_key(qemu, kernel) != key


def test_cached_verdict_only_under_the_same_key(files: tuple[Path, Path]) -> None:
    key = probe_key(*files)
    document = cache_document(key, AccelVerdict("tcg", "nested"))
    assert cached_verdict(document, key) == AccelVerdict("tcg", "nested", cached=True)
    assert cached_verdict(document, {**key, "boot_id": "another boot"}) is None
    assert cached_verdict({**document, "accelerator": "auto"}, key) is None
    assert cached_verdict({}, key) is None


def test_corrupt_cache_is_an_empty_one(tmp_path: Path) -> None:
    (tmp_path / "accel.json").write_text("{not json")
    assert read_cache(tmp_path / "accel.json") == {}
    (tmp_path / "accel.json").write_text("[1, 2]")
    assert read_cache(tmp_path / "accel.json") == {}
    assert read_cache(tmp_path / "missing.json") == {}


@pytest.mark.usefixtures("kvm_opens")
def test_probe_runs_once_then_the_cache_answers(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qemu, kernel = files
    cache = tmp_path / "cache"
    runs: list[Path] = []

    def fake_probe(hypervisor_path: Path, kernel_path: Path, timeout: float) -> AccelVerdict:
        runs.append(kernel_path)
        return AccelVerdict("tcg", "no sign of life")

    monkeypatch.setattr(accel, "run_probe", fake_probe)
    first = probe_accelerator(qemu, kernel, cache)
    assert first == AccelVerdict("tcg", "no sign of life")
    second = probe_accelerator(qemu, kernel, cache)
    assert second == AccelVerdict("tcg", "no sign of life", cached=True)
    assert runs == [kernel]
    stored = json.loads((cache / "accel.json").read_text())
    assert stored["key"] == probe_key(qemu, kernel)
    # A new guest kernel invalidates the verdict.
    kernel.write_bytes(b"new kernel")
    probe_accelerator(qemu, kernel, cache)
    assert len(runs) == 2


@pytest.mark.usefixtures("kvm_opens")
def test_unwritable_cache_still_gives_a_verdict(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accel, "run_probe", lambda *a: AccelVerdict("kvm", "booted"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert probe_accelerator(*files, blocker / "cache").accelerator == "kvm"


def test_missing_kvm_device_means_tcg_without_probing(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accel, "run_probe", no_probe)
    verdict = probe_accelerator(*files, tmp_path, kvm_device=tmp_path / "kvm")
    assert verdict.accelerator == "tcg"
    assert "does not exist" in verdict.reason
    assert not (tmp_path / "accel.json").exists()


def test_kvm_device_checks(tmp_path: Path) -> None:
    assert "does not exist" in (kvm_unusable_reason(tmp_path / "kvm") or "")
    not_kvm = tmp_path / "not-kvm"
    not_kvm.write_text("")
    assert "not a KVM device" in (kvm_unusable_reason(not_kvm) or "")


def test_banner_alone_is_not_enough() -> None:
    assert verdict_from_probe(BANNER + PANIC, b"", None, 3, 0.4) == AccelVerdict(
        "kvm", "a guest kernel booted under KVM in 0.40 s"
    )
    started = verdict_from_probe(BANNER, b"", None, 3, 3.0)
    assert started.accelerator == "tcg"
    assert "did not finish booting within 3 s" in started.reason
    silent = verdict_from_probe(b"", b"", None, 3, 3.0)
    assert silent == AccelVerdict(
        "tcg", "KVM opened but a guest showed no sign of life within 3 s (nested or broken virtualization)"
    )


def test_qemu_failing_under_kvm_gives_its_message() -> None:
    stderr = b"qemu-system-x86_64: error: failed to set MSR 0x10a\nqemu-system-x86_64: Assertion failed.\n"
    verdict = verdict_from_probe(b"", stderr, -6, 3, 0.1)
    assert verdict == AccelVerdict("tcg", "QEMU could not run a KVM guest: qemu-system-x86_64: Assertion failed.")
    assert "exit status 1" in verdict_from_probe(b"", b"", 1, 3, 0.1).reason


def test_probe_boots_the_kernel_alone_with_the_drivers_cpu_model() -> None:
    args = probe_argv(Path("/usr/bin/qemu-system-x86_64"), Path("/k"))
    assert args[args.index("-accel") + 1] == "kvm"
    assert args[args.index("-cpu") + 1] == "host"
    assert args[args.index("-kernel") + 1] == "/k"
    assert "-initrd" not in args
    assert "panic=-1" in args[args.index("-append") + 1]
    assert "-no-reboot" in args


def test_forced_tcg_skips_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "run_probe", no_probe)
    verdict = resolve_accelerator(Config(hypervisor=HypervisorConfig(accelerator="tcg")))
    assert verdict.accelerator == "tcg"
    assert "forced" in verdict.reason


def test_forced_kvm_needs_a_usable_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "run_probe", no_probe)
    config = Config(hypervisor=HypervisorConfig(accelerator="kvm"), source=Path("/etc/capsa/configuration.toml"))
    with pytest.raises(HypervisorError, match=r"is \"kvm\" \(set in /etc/capsa/configuration.toml\) but .* does not"):
        resolve_accelerator(config, kvm_device=tmp_path / "kvm")
    monkeypatch.setattr(accel, "kvm_unusable_reason", lambda device: None)
    assert resolve_accelerator(config).accelerator == "kvm"


def test_auto_probes_with_the_configured_files(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qemu, kernel = files
    monkeypatch.setenv("CAPSA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(accel, "kvm_unusable_reason", lambda device: None)
    seen: list[tuple[Path, Path]] = []

    def fake_probe(hypervisor_path: Path, kernel_path: Path, timeout: float) -> AccelVerdict:
        seen.append((hypervisor_path, kernel_path))
        return AccelVerdict("tcg", "nested")

    monkeypatch.setattr(accel, "run_probe", fake_probe)
    config = Config(hypervisor=HypervisorConfig(path=qemu, kernel=kernel))
    assert resolve_accelerator(config) == AccelVerdict("tcg", "nested")
    assert seen == [(qemu, kernel)]
    assert (tmp_path / "cache" / "accel.json").exists()
