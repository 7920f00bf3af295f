"""Container IDs, checked the way runc checks them.

runc accepts IDs matching ``^[\\w+\\-.]+$`` except ``.`` and ``..``; an ID is a
directory name under the state root, so anything else (a ``/``, a NUL, an
empty string) could escape it.
"""

from __future__ import annotations

import re

from capsa.errors import InvalidArgument

_ID = re.compile(r"[\w+\-.]+", re.ASCII)
MAX_ID_LENGTH = 1024


def validate_id(container_id: str) -> str:
    if not container_id:
        raise InvalidArgument("container id cannot be empty")
    if container_id in (".", "..") or len(container_id) > MAX_ID_LENGTH or not _ID.fullmatch(container_id):
        raise InvalidArgument(f"invalid container id {container_id!r}: use letters, digits, '_', '+', '-', '.'")
    return container_id
