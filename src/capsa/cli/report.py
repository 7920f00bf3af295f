"""How capsa speaks to its caller: one error line, and an optional log file.

Engines read runc's log: containerd's runc shim takes the error text from the
last ``"level":"error"`` line of the ``--log`` file written with
``--log-format json`` (logrus's JSON fields: ``level``, ``msg``, ``time``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "level": _LEVELS.get(record.levelno, "info"),
                "msg": record.getMessage(),
                "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            }
        )


# Until setup_logging() runs (a usage error comes first), logging's last
# resort would print our errors to stderr a second time.
logging.getLogger("capsa").addHandler(logging.NullHandler())

_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}


def setup_logging(log_file: str | None, log_format: str, debug: bool) -> None:
    root = logging.getLogger("capsa")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    if log_file:
        try:
            handler: logging.Handler = logging.FileHandler(log_file)
        except OSError as exc:
            from capsa.errors import InvalidArgument

            raise InvalidArgument(f"--log {log_file}: {exc.strerror}") from exc
        formatter: logging.Formatter = (
            JsonFormatter() if log_format == "json" else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        )
        handler.setFormatter(formatter)
        root.addHandler(handler)
    if debug:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(logging.Formatter("capsa[%(relativeCreated)6.0fms] %(message)s"))
        root.addHandler(stderr)
    elif not log_file:
        # Without --log, warnings go to stderr, as runc's do (an engine always passes --log).
        # Errors are not: report_error prints the one line a failure gets.
        warnings = logging.StreamHandler(sys.stderr)
        warnings.addFilter(lambda record: record.levelno == logging.WARNING)
        warnings.setFormatter(logging.Formatter("capsa: warning: %(message)s"))
        root.addHandler(warnings)


def report_error(message: str, log_format: str) -> None:
    """The one line the user sees, also recorded in the --log file."""
    logging.getLogger("capsa").error("%s", message)
    if log_format == "json":
        line = json.dumps({"level": "error", "msg": message, "time": _now()})
    else:
        line = f"capsa: {message}"
    print(line, file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.fromtimestamp(time.time(), UTC).isoformat()
