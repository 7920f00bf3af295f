"""Making a VM restored from a template its sandbox's own (CreateSandbox).

Every clone of a template resumes with the template's memory: the same
kernel RNG state and a wall clock as old as the save.  The host sends fresh
entropy and its time with ``CreateSandbox``; virtio-fs devices it plugged
after the restore may still be probing, so the agent waits for them before
a container's rootfs mount needs them.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import time

from capsa.errors import AgentError

# <linux/random.h>: RNDADDENTROPY = _IOW('R', 0x03, int[2]); its argument is
# struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }.
RNDADDENTROPY = 0x40085203
# RNDRESEEDCRNG = _IO('R', 0x07): reseed the CRNG from the input pool now.
RNDRESEEDCRNG = 0x5207
VIRTIOFS_DRIVER_DIR = "/sys/bus/virtio/drivers/virtiofs"
VIRTIOFS_WAIT_SECONDS = 30.0


def rand_pool_info(data: bytes) -> bytes:
    """The RNDADDENTROPY argument for ``data``, crediting 8 bits per byte
    (the host's bytes come from its CSPRNG)."""
    padded = data + b"\0" * (-len(data) % 4)
    return struct.pack("ii", len(data) * 8, len(data)) + padded


def add_entropy(data: bytes, device: str = "/dev/urandom") -> None:
    """Mix ``data`` into the kernel's input pool and reseed the CRNG from it
    (RNDADDENTROPY, then RNDRESEEDCRNG; both need CAP_SYS_ADMIN).

    Once the CRNG is ready, new input only reaches its key at the next
    scheduled reseed (drivers/char/random.c, crng_has_old_seed): until then
    every clone would go on producing the template's stream.  The explicit
    reseed makes the clones' outputs diverge from this call on.
    """
    if not data:
        return
    request = rand_pool_info(data)
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, request)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError as exc:
        raise AgentError(f"cannot add entropy to {device}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def set_realtime(nanoseconds: int) -> None:
    """Set CLOCK_REALTIME (clock_settime(2)); 0 leaves it alone."""
    if nanoseconds <= 0:
        return
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, nanoseconds)
    except OSError as exc:
        raise AgentError(f"cannot set the clock: {exc.strerror}") from exc


def bound_virtiofs_devices(driver_dir: str = VIRTIOFS_DRIVER_DIR) -> int:
    """How many devices the virtiofs driver has bound (its sysfs links ``virtioN``)."""
    try:
        return sum(1 for name in os.listdir(driver_dir) if name.startswith("virtio"))
    except FileNotFoundError:
        return 0


async def wait_virtiofs_devices(count: int, driver_dir: str = VIRTIOFS_DRIVER_DIR) -> None:
    """Wait until ``count`` virtio-fs devices are bound (probe done: their tags mount)."""
    deadline = time.monotonic() + VIRTIOFS_WAIT_SECONDS
    delay = 0.001
    while bound_virtiofs_devices(driver_dir) < count:
        if time.monotonic() > deadline:
            raise AgentError(
                f"{count} virtio-fs device(s) expected, the guest found {bound_virtiofs_devices(driver_dir)}"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)
