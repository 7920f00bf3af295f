"""The guest console's log read back: the last words an error quotes when a VM stops.

The console (the guest kernel's messages and the agent's log, which the
agent writes to ``/dev/console``) is kept in ``console.log`` in the
sandbox's state directory (:mod:`capsa.hypervisor.bounded_log`) until
``capsa delete``, and sent to the journal when journald runs
(:mod:`capsa.hypervisor.journal`).  When the VM stops on its own, the
proxy's log, the shims (on the process's stderr: the engine's container
log, ``capsa run``'s stderr) and a failed create quote its last words:
the kernel's panic line when it panicked (the call trace after it says
less than its first line does), else the last few lines.

Pure, apart from :func:`read_tail`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

#: The first line of every kernel panic (kernel/panic.c).
PANIC_MARK = "Kernel panic - not syncing"
#: How much of the end of the log is read for its last words.
TAIL_BYTES = 64 << 10
#: Lines quoted when the kernel did not panic.
QUOTED_LINES = 3
#: Characters kept of each quoted line.
MAX_QUOTED_CHARS = 300

_PRINTK_TIME = re.compile(r"^\[\s*\d+\.\d+\]\s*")


def read_tail(path: Path, size: int = TAIL_BYTES) -> str:
    """The last ``size`` bytes of the log as text; "" when it does not exist (any more)."""
    try:
        with open(path, "rb") as file:
            file.seek(0, 2)
            file.seek(max(0, file.tell() - size))
            return file.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _clean(line: str) -> str:
    """One line fit for a one-line error: no printk timestamp, no control characters."""
    line = _PRINTK_TIME.sub("", line.strip())
    line = "".join(ch if ch.isprintable() else " " for ch in line)
    line = " ".join(line.split())
    if len(line) > MAX_QUOTED_CHARS:
        line = line[: MAX_QUOTED_CHARS - 3] + "..."
    return line


def last_words(text: str, count: int = QUOTED_LINES) -> tuple[str, ...]:
    """The lines to quote: the last panic line if the kernel panicked, else the last ``count`` lines."""
    lines = [cleaned for cleaned in (_clean(line) for line in text.splitlines()) if cleaned]
    for line in reversed(lines):
        if PANIC_MARK in line:
            return (line,)
    return tuple(lines[-count:]) if count > 0 else ()


def quote(words: Sequence[str]) -> str:
    """``guest console: A | B``, for an error message."""
    if not words:
        return "the guest console printed nothing"
    return "guest console: " + " | ".join(words)


def panicked(words: Sequence[str]) -> bool:
    return any(PANIC_MARK in word for word in words)
