"""Where a container's VM keeps its sockets: ``/run/capsa-vm/<key>/`` (runtime/state.py says why).

Apart from the state store, and in plain strings, so that capsa-shim, which
lives as long as its container, finds the proxy's sockets without
importing the store (or pathlib).
"""

from __future__ import annotations

import hashlib
import os

#: Where every container's socket directory lives: short, and outside any
#: state root, so that no container ID can name it (state.SOCKET_ROOT).
SOCKET_ROOT_PATH = "/run/capsa-vm"
#: Hex digits of the key naming a socket directory: 96 bits, so two state
#: directories never meet by chance.
SOCKET_KEY_LENGTH = 24


def socket_key(state_dir: str | os.PathLike[str]) -> str:
    """The name of the socket directory that belongs to ``state_dir``."""
    absolute = os.path.abspath(state_dir)
    return hashlib.sha256(os.fsencode(absolute)).hexdigest()[:SOCKET_KEY_LENGTH]
