"""`kill`'s signal argument, read as runc reads it."""

from __future__ import annotations

import signal

import pytest

from capsa.cli.signals import _NAMES, DEFAULT_KILL_SIGNAL, parse_signal
from capsa.errors import InvalidArgument


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("9", 9),
        ("+9", 9),
        ("0", 0),
        ("15", 15),
        ("64", 64),
        ("KILL", 9),
        ("kill", 9),
        ("SIGKILL", 9),
        ("sigkill", 9),
        ("SigKill", 9),
        ("TERM", 15),
        ("SIGHUP", 1),
        ("usr1", 10),
        ("SIGWINCH", 28),
        ("CLD", 17),
        ("IOT", 6),
        ("POLL", 29),
        ("RTMIN", 34),
        ("SIGRTMIN+3", 37),
        ("rtmax-1", 63),
        ("RTMAX", 64),
    ],
)
def test_known(text: str, number: int) -> None:
    assert parse_signal(text) == number


@pytest.mark.parametrize(
    "text",
    ["", "SIG", "SIGSIGKILL", "KIL", "-9", "65", "1000", " 9", "9 ", "RTMIN+16", "RTMAX-15", "SIG_KILL", "٣"],
)
def test_unknown(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_signal(text)
    assert str(info.value).startswith("unknown signal ")


def test_message_quotes_like_go() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_signal("FOO")
    assert str(info.value) == 'unknown signal "FOO"'
    with pytest.raises(InvalidArgument) as info:
        parse_signal('a"b\n')
    assert str(info.value) == 'unknown signal "a\\"b\\n"'


def test_default_is_sigterm() -> None:
    assert DEFAULT_KILL_SIGNAL == signal.SIGTERM == 15


def test_table_matches_this_host() -> None:
    for name, number in _NAMES.items():
        if name.startswith(("RTMIN", "RTMAX")):
            continue
        assert getattr(signal, "SIG" + name) == number, name
    assert _NAMES["RTMIN"] == signal.SIGRTMIN
    assert _NAMES["RTMAX"] == signal.SIGRTMAX
