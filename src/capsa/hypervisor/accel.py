"""Choosing the accelerator: KVM when it really runs a guest, else TCG.

``/dev/kvm`` existing is not enough: on a nested host it opens, QEMU starts,
QMP says "running", and the guest hangs at its first instruction (DESIGN.md,
decision 1).  So ``auto`` boots the guest kernel once under KVM with the CPU model
the driver will use (``-cpu host``), no initrd and its console on a pipe, and
wants the kernel to boot to its end (the panic for want of a root
filesystem) within a bound.  The verdict is cached in a JSON
file, keyed by everything that could change it: the host kernel release, the
boot (``/proc/sys/kernel/random/boot_id``), the QEMU binary and the guest
kernel.  A configuration that forces ``kvm`` or ``tcg`` skips the probe.

The key, the cache file format and the reading of a probe's output are pure
functions, tested without booting anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import selectors
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsa.config import Config, cache_dir
from capsa.errors import HypervisorError
from capsa.hypervisor.process import die_with_parent_hook

log = logging.getLogger("capsa.hypervisor.accel")

KVM_DEVICE = Path("/dev/kvm")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
CACHE_FILE = "accel.json"
#: Bumped when the probe changes meaning, so older verdicts are not reused.
CACHE_VERSION = 1
DEFAULT_PROBE_TIMEOUT = 3.0

#: What a guest kernel prints first on its console (init/main.c, linux_banner).
SIGN_OF_LIFE = b"Linux version"
#: What it prints last when it has neither initrd nor root device.
BOOT_FINISHED = (b"Kernel panic", b"VFS: Unable to mount root")

# KVM_GET_API_VERSION = _IO(KVMIO=0xAE, 0x00); the API version has been 12
# since Linux 2.6.22 (Documentation/virt/kvm/api.rst, 4.1).
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12


@dataclass(frozen=True)
class AccelVerdict:
    """The accelerator to use and the reason, in words for ``capsa check``."""

    accelerator: str  # "kvm" or "tcg"
    reason: str
    #: True when the verdict came from the cache rather than a probe just now.
    cached: bool = False


def kvm_unusable_reason(device: Path = KVM_DEVICE) -> str | None:
    """Why ``device`` cannot serve KVM, or None when it opens and speaks KVM API 12."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{device} does not exist (no hardware virtualization, or the kvm module is not loaded)"
    except OSError as exc:
        return f"{device} cannot be opened: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return f"{device} is not a KVM device: {exc.strerror}"
    finally:
        os.close(fd)
    if version != _KVM_API_VERSION:
        return f"{device} speaks KVM API {version}, QEMU needs {_KVM_API_VERSION}"
    return None


def _file_identity(path: Path) -> dict[str, Any]:
    """A file as the cache key sees it: replaced or rebuilt means a new key."""
    try:
        st = path.stat()
    except OSError:
        return {"path": str(path), "missing": True}
    return {"path": str(path), "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def probe_key(hypervisor_path: Path, kernel: Path) -> dict[str, Any]:
    """What the probe's verdict depends on, read from the host now."""
    try:
        boot_id = BOOT_ID.read_text().strip()
    except OSError:
        boot_id = ""
    return {
        "version": CACHE_VERSION,
        "host_kernel": os.uname().release,
        "boot_id": boot_id,
        "hypervisor": _file_identity(hypervisor_path),
        "guest_kernel": _file_identity(kernel),
    }


def cached_verdict(document: Mapping[str, Any], key: Mapping[str, Any]) -> AccelVerdict | None:
    """The verdict stored in ``document`` if it was made under ``key``."""
    if document.get("key") != key:
        return None
    accelerator = document.get("accelerator")
    reason = document.get("reason")
    if accelerator not in ("kvm", "tcg") or not isinstance(reason, str):
        return None
    return AccelVerdict(accelerator, reason, cached=True)


def cache_document(key: Mapping[str, Any], verdict: AccelVerdict) -> dict[str, Any]:
    return {"key": dict(key), "accelerator": verdict.accelerator, "reason": verdict.reason, "probed_at": time.time()}


def read_cache(path: Path) -> dict[str, Any]:
    """The cache file's content; an unreadable or corrupt cache is an empty one."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def write_cache(path: Path, document: Mapping[str, Any]) -> None:
    """Replace the cache file atomically; a cache that cannot be written is only logged."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".accel-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(document, f, indent=2)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        log.warning("cannot cache the accelerator verdict in %s: %s", path, exc.strerror)


def probe_argv(hypervisor_path: Path, kernel: Path) -> list[str]:
    """The smallest KVM guest that shows it works: the kernel alone, console on stdout.

    Without an initrd or root device the kernel panics at the end of its
    boot, which is the point: the panic proves it ran, and ``-no-reboot``
    with ``panic=-1`` ends QEMU.  ``-cpu host`` as in
    :func:`capsa.hypervisor.qemu.qemu_argv`: a nested host may run one CPU
    model and not another.
    """
    return [
        str(hypervisor_path),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-machine",
        "q35",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256M",
        "-kernel",
        str(kernel),
        "-append",
        "console=ttyS0 earlyprintk=ttyS0 panic=-1",
        "-serial",
        "stdio",
    ]


def kernel_finished_booting(console: bytes) -> bool:
    """The probe kernel got from its banner to looking for a root filesystem.

    A banner alone is too weak: on a nested host a guest with a plain CPU
    model prints it through ``earlyprintk`` and then crawls and stalls in
    memory setup.  A kernel with no initrd and no root device panics at the
    end of its boot (init/do_mounts.c, mount_block_root), so the panic is the
    proof that the whole kernel ran.
    """
    return SIGN_OF_LIFE in console and any(mark in console for mark in BOOT_FINISHED)


def verdict_from_probe(
    console: bytes, vmm_stderr: bytes, exit_status: int | None, timeout: float, elapsed: float
) -> AccelVerdict:
    """Read what a KVM probe showed: a kernel that boots to its end means KVM works."""
    if kernel_finished_booting(console):
        return AccelVerdict("kvm", f"a guest kernel booted under KVM in {elapsed:.2f} s")
    lines = vmm_stderr.decode(errors="replace").splitlines()
    said = next((line.strip() for line in reversed(lines) if line.strip()), "")
    if exit_status is not None:
        detail = f": {said}" if said else f" (exit status {exit_status})"
        return AccelVerdict("tcg", f"QEMU could not run a KVM guest{detail}")
    if SIGN_OF_LIFE in console:
        return AccelVerdict(
            "tcg",
            f"KVM opened and a guest kernel started but did not finish booting within {timeout:g} s "
            "(nested or broken virtualization)",
        )
    return AccelVerdict(
        "tcg", f"KVM opened but a guest showed no sign of life within {timeout:g} s (nested or broken virtualization)"
    )


def run_probe(hypervisor_path: Path, kernel: Path, timeout: float = DEFAULT_PROBE_TIMEOUT) -> AccelVerdict:
    """Boot ``kernel`` under KVM and watch its console for up to ``timeout`` seconds."""
    argv = probe_argv(hypervisor_path, kernel)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent_hook(),
        )
    except OSError as exc:
        raise HypervisorError(f"cannot execute {hypervisor_path}: {exc.strerror}") from exc
    console = b""
    stderr = b""
    assert proc.stdout is not None and proc.stderr is not None
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            selector.register(proc.stderr, selectors.EVENT_READ)
            while selector.get_map() and not kernel_finished_booting(console):
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    break
                for ready, _ in selector.select(left):
                    chunk = os.read(ready.fd, 65536)
                    if not chunk:
                        selector.unregister(ready.fileobj)
                    elif ready.fileobj is proc.stdout:
                        console += chunk
                    else:
                        stderr += chunk
        elapsed = time.monotonic() - started
        exit_status = proc.poll()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return verdict_from_probe(console, stderr, exit_status, timeout, elapsed)


def probe_accelerator(
    hypervisor_path: Path,
    kernel: Path,
    cache_root: Path,
    *,
    timeout: float = DEFAULT_PROBE_TIMEOUT,
    kvm_device: Path = KVM_DEVICE,
) -> AccelVerdict:
    """The ``auto`` choice: KVM if it runs a guest here, else TCG, and why.

    The device check runs every time (it is cheap, and permissions change);
    only the boot probe's verdict is cached under ``cache_root``.
    """
    unusable = kvm_unusable_reason(kvm_device)
    if unusable is not None:
        return AccelVerdict("tcg", unusable)
    if not kernel.exists():
        raise HypervisorError(f"cannot probe KVM: guest kernel {kernel} does not exist")
    cache_path = cache_root / CACHE_FILE
    key = probe_key(hypervisor_path, kernel)
    verdict = cached_verdict(read_cache(cache_path), key)
    if verdict is not None:
        return verdict
    verdict = run_probe(hypervisor_path, kernel, timeout)
    log.info("accelerator probe: %s (%s)", verdict.accelerator, verdict.reason)
    write_cache(cache_path, cache_document(key, verdict))
    return verdict


def resolve_accelerator(config: Config, *, kvm_device: Path = KVM_DEVICE) -> AccelVerdict:
    """The accelerator for ``config``: forced by ``hypervisor.accelerator``, or probed."""
    hv = config.hypervisor
    where = f" (set in {config.source})" if config.source else ""
    if hv.accelerator == "tcg":
        return AccelVerdict("tcg", f'forced by hypervisor.accelerator = "tcg"{where}')
    if hv.accelerator == "kvm":
        unusable = kvm_unusable_reason(kvm_device)
        if unusable is not None:
            raise HypervisorError(f'hypervisor.accelerator is "kvm"{where} but {unusable}')
        return AccelVerdict("kvm", f'forced by hypervisor.accelerator = "kvm"{where}')
    return probe_accelerator(hv.path, hv.kernel, cache_dir(), kvm_device=kvm_device)


__all__ = [
    "AccelVerdict",
    "kvm_unusable_reason",
    "probe_accelerator",
    "probe_key",
    "resolve_accelerator",
    "run_probe",
    "verdict_from_probe",
]
