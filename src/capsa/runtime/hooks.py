"""OCI hooks, run on the host.

The runtime-spec (config.md, "POSIX-platform Hooks") lets a bundle name
programs the runtime runs at fixed points of the lifecycle (runtime.md,
"Lifecycle"): ``prestart`` (deprecated), ``createRuntime`` and
``createContainer`` during ``create``; ``startContainer`` then ``poststart``
around ``start``; ``poststop`` during ``delete``.  Each entry is
``{path, args?, env?, timeout?}``: ``path`` is absolute and executed like
``execv(path, args)`` (so ``args[0]`` is ``argv[0]``), ``env`` is the whole
environment, and the container's state (runtime.md, "State") arrives on
stdin as JSON.

capsa runs every hook on the host, never in the guest: the engines' hooks
(network setup, device injection, OCI prestart plugins) expect the host's
namespaces, and the agent strips ``hooks`` from the spec it hands to crun.
The container's namespaces live in the guest, so the paths a runc hook
might read under ``/proc/<pid>/ns`` name the shim's namespaces here.

A failing hook of the first four stages fails the operation (runtime.md:
"the runtime MUST generate an error"): :func:`run_hooks` raises
:class:`~capsa.errors.HookError`.  A failing ``poststart`` or ``poststop``
hook is only worth a warning (runtime.md: "the runtime MUST log a warning,
but the remaining hooks and lifecycle continue"): :func:`run_hooks_warn`.

Hooks write to files, not pipes, so that a hook leaving a daemon behind
with our stderr open cannot hang the runtime, and a hook that never reads
its stdin cannot block us on a large state document.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from capsa.errors import BundleError, HookError

log = logging.getLogger("capsa.hooks")

STAGES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
"""The hook stages of runtime-spec 1.0.2 / 1.1, in lifecycle order."""

WARN_ONLY_STAGES = frozenset({"poststart", "poststop"})
"""Stages whose failures runtime.md turns into warnings."""

_STDERR_TAIL = 300  # characters of the hook's last stderr line kept in the error


@dataclass(frozen=True)
class Hook:
    """One validated entry of ``spec["hooks"][stage]``."""

    path: str
    args: tuple[str, ...]
    env: tuple[str, ...]
    timeout: int | None

    @property
    def argv(self) -> list[str]:
        """execv's argv: ``args`` as given, or just the path when absent or empty."""
        return list(self.args) if self.args else [self.path]


def parse_hooks(spec: Mapping[str, Any], stage: str) -> list[Hook]:
    """The hooks of one stage, checked against config.md; BundleError names the bad field."""
    if stage not in STAGES:
        raise ValueError(f"unknown hook stage {stage!r}")
    hooks = spec.get("hooks")
    if hooks is None:
        return []
    if not isinstance(hooks, Mapping):
        raise BundleError("config.json: hooks must be an object")
    entries = hooks.get(stage)
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise BundleError(f"config.json: hooks.{stage} must be an array")
    return [_parse_hook(entry, f"hooks.{stage}[{i}]") for i, entry in enumerate(entries)]


def validate_hooks(spec: Mapping[str, Any]) -> None:
    """Check every stage at once, so that ``create`` refuses a bad bundle before it starts a VM."""
    for stage in STAGES:
        parse_hooks(spec, stage)


def run_hooks(
    spec: Mapping[str, Any],
    stage: str,
    state: Mapping[str, Any],
    cwd: str | None = None,
) -> None:
    """Run the stage's hooks in order; the first failure raises HookError and stops the rest.

    ``state`` is the runtime.md "State" object (ociVersion, id, status, pid,
    bundle, annotations) that each hook reads on stdin.  ``cwd`` defaults to
    the state's bundle, where runc runs its hooks (it changes into the bundle
    directory before creating the container).
    """
    hooks = parse_hooks(spec, stage)
    if not hooks:
        return
    state_json = json.dumps(dict(state)).encode()
    workdir = cwd if cwd is not None else _bundle_dir(state)
    for hook in hooks:
        run_hook(hook, stage, state_json, workdir)


def run_hooks_warn(
    spec: Mapping[str, Any],
    stage: str,
    state: Mapping[str, Any],
    cwd: str | None = None,
) -> None:
    """Run the stage's hooks; a failure is logged as a warning and the next hook still runs.

    For ``poststart`` and ``poststop`` (runtime.md, "Lifecycle" steps 9 and
    13).  An invalid hook entry is reported the same way: by then the
    container exists, and ``delete`` must not fail because of a hook.
    """
    try:
        hooks = parse_hooks(spec, stage)
    except BundleError as exc:
        log.warning("%s hooks not run: %s", stage, exc)
        return
    if not hooks:
        return
    state_json = json.dumps(dict(state)).encode()
    workdir = cwd if cwd is not None else _bundle_dir(state)
    for hook in hooks:
        try:
            run_hook(hook, stage, state_json, workdir)
        except HookError as exc:
            log.warning("%s", exc)


def run_hook(hook: Hook, stage: str, state_json: bytes, cwd: str | None = None) -> None:
    """Run one hook to completion: state on stdin, its output to files, the timeout enforced.

    The hook gets a process group of its own so that a timeout kills what it
    started too (runc only kills the hook; a hook's children holding on to
    a lock would otherwise outlive the failed operation).
    """
    with (
        tempfile.TemporaryFile() as stdin,
        tempfile.TemporaryFile() as stdout,
        tempfile.TemporaryFile() as stderr,
    ):
        stdin.write(state_json)
        stdin.seek(0)
        try:
            proc = subprocess.Popen(
                hook.argv,
                executable=hook.path,
                env=_environ(hook.env),
                cwd=cwd,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                close_fds=True,
                process_group=0,
            )
        except OSError as exc:
            raise HookError(f"{stage} hook {hook.path} failed: cannot execute: {exc.strerror}") from exc
        why: str | None
        try:
            returncode = proc.wait(timeout=hook.timeout)
            why = _describe_status(returncode)
        except subprocess.TimeoutExpired:
            why = f"timed out after {hook.timeout}s"
        finally:
            if proc.poll() is None:
                _kill_group(proc)
        _log_output(stage, hook, stdout)
        if why is None:
            return
        tail = _last_line(stderr)
        raise HookError(f"{stage} hook {hook.path} failed: {why}" + (f": {tail}" if tail else ""))


def _parse_hook(entry: Any, where: str) -> Hook:
    if not isinstance(entry, Mapping):
        raise BundleError(f"config.json: {where} must be an object")
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        raise BundleError(f"config.json: {where}.path is required")
    if not os.path.isabs(path):
        # config.md: "This specification extends the IEEE standard in that path MUST be absolute."
        raise BundleError(f"config.json: {where}.path must be absolute, not {path!r}")
    args = _strings(entry.get("args"), f"{where}.args")
    env = _strings(entry.get("env"), f"{where}.env")
    for item in env:
        if "=" not in item:
            raise BundleError(f"config.json: {where}.env entry {item!r} is not NAME=VALUE")
    timeout = entry.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0):
        # config.md: "If set, timeout MUST be greater than zero."
        raise BundleError(f"config.json: {where}.timeout must be a positive number of seconds, not {timeout!r}")
    return Hook(path=path, args=args, env=env, timeout=timeout)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BundleError(f"config.json: {where} must be an array of strings")
    return tuple(value)


def _environ(env: Sequence[str]) -> dict[str, str]:
    """``NAME=VALUE`` strings as Popen's mapping; a repeated name keeps its last value."""
    out: dict[str, str] = {}
    for item in env:
        name, _, value = item.partition("=")
        out[name] = value
    return out


def _bundle_dir(state: Mapping[str, Any]) -> str | None:
    bundle = state.get("bundle")
    if isinstance(bundle, str) and os.path.isdir(bundle):
        return bundle
    return None


def _describe_status(returncode: int) -> str | None:
    if returncode == 0:
        return None
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit status {returncode}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _last_line(stream: IO[bytes]) -> str:
    stream.seek(0)
    lines = [line.strip() for line in stream.read().decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    tail = lines[-1]
    return tail if len(tail) <= _STDERR_TAIL else tail[: _STDERR_TAIL - 3] + "..."


def _log_output(stage: str, hook: Hook, stdout: IO[bytes]) -> None:
    if not log.isEnabledFor(logging.DEBUG):
        return
    stdout.seek(0)
    text = stdout.read().decode(errors="replace").strip()
    if text:
        log.debug("%s hook %s wrote: %s", stage, hook.path, text)
