"""Signal names and numbers as ``runc kill`` reads them.

runc (``kill.go``, 1.1) first tries the argument as a decimal integer
(Go's ``strconv.Atoi``: an optional sign, then ASCII digits), and otherwise
looks it up by name with ``moby/sys/signal``: upper-cased, one leading
``SIG`` removed, in Linux's table, which has the aliases ``CLD``, ``IOT``
and ``POLL`` and the real-time signals ``RTMIN``, ``RTMIN+1`` ..
``RTMIN+15``, ``RTMAX-14`` .. ``RTMAX-1``, ``RTMAX`` (glibc's SIGRTMIN is 34:
NPTL keeps 32 and 33).  So ``9``, ``KILL``, ``kill``, ``SIGKILL`` and
``sigKill`` are all SIGKILL, while ``SIGSIGKILL`` and ``SIG`` are unknown.

One difference: runc passes any integer to kill(2) and reports the
kernel's EINVAL; capsa forwards the number to the guest, so it refuses a
number outside 0..64 here with the same message as an unknown name.
Signal 0 is allowed, as in runc: it checks that the process exists.
"""

from __future__ import annotations

import json
import re
import signal

from capsa.errors import InvalidArgument

DEFAULT_KILL_SIGNAL = int(signal.SIGTERM)
"""What ``kill`` sends when no signal is given (runc: SIGTERM)."""

_SIGRTMIN = 34
_SIGRTMAX = 64

_NAMES: dict[str, int] = {
    "ABRT": 6,
    "ALRM": 14,
    "BUS": 7,
    "CHLD": 17,
    "CLD": 17,
    "CONT": 18,
    "FPE": 8,
    "HUP": 1,
    "ILL": 4,
    "INT": 2,
    "IO": 29,
    "IOT": 6,
    "KILL": 9,
    "PIPE": 13,
    "POLL": 29,
    "PROF": 27,
    "PWR": 30,
    "QUIT": 3,
    "SEGV": 11,
    "STKFLT": 16,
    "STOP": 19,
    "SYS": 31,
    "TERM": 15,
    "TRAP": 5,
    "TSTP": 20,
    "TTIN": 21,
    "TTOU": 22,
    "URG": 23,
    "USR1": 10,
    "USR2": 12,
    "VTALRM": 26,
    "WINCH": 28,
    "XCPU": 24,
    "XFSZ": 25,
    "RTMIN": _SIGRTMIN,
    "RTMAX": _SIGRTMAX,
    **{f"RTMIN+{n}": _SIGRTMIN + n for n in range(1, 16)},
    **{f"RTMAX-{n}": _SIGRTMAX - n for n in range(1, 15)},
}
"""Linux's x86/arm signal numbers (signal(7)); the guest is the same architecture as the host."""

_NUMBER = re.compile(r"[+-]?[0-9]+")


def parse_signal(text: str) -> int:
    """The signal number ``text`` names, by runc's rules; InvalidArgument if it names none."""
    if _NUMBER.fullmatch(text):
        number = int(text)
        if 0 <= number <= _SIGRTMAX:
            return number
    else:
        name = text.upper().removeprefix("SIG")
        if name in _NAMES:
            return _NAMES[name]
    # Go's %q, as runc prints it: quoted, escapes kept on one line.
    raise InvalidArgument(f"unknown signal {json.dumps(text, ensure_ascii=False)}")
