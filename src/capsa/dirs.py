"""Directories capsa owns, made with the modes we mean whatever the umask.

``mkdir(mode=...)`` is filtered by the caller's umask, and ``parents=True``
makes the missing parents with the umask's default: under ``umask 000`` a
cache or socket directory would come out world-writable, and any local user
could replace a VM template or a socket in it.  :func:`ensure_dir` sets each
mode explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path


def ensure_dir(path: Path, mode: int, parents_mode: int = 0o755) -> Path:
    """Make ``path`` (and its missing parents, ``parents_mode``) and give it exactly ``mode``.

    An existing ``path`` gets ``mode`` too: it is ours.  Existing parents
    are left as they are: they may be the host's (``/run``, ``/var/cache``).
    Raises OSError.
    """
    missing = []
    parent = path
    while not parent.exists():
        missing.append(parent)
        if parent.parent == parent:
            break
        parent = parent.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by another process: its mode is its maker's
        os.chmod(directory, mode if directory == path else parents_mode)
    os.chmod(path, mode)
    return path
