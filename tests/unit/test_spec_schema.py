"""config.json and exec --process against the runtime-spec's schema: wrong types refused, naming the field.

The specs engines write (tests/unit/specs: Podman 4.3, containerd 1.6's
``ctr oci spec``, ``runc spec``, and one with every field of runtime-spec
1.2 plus fields of specs to come) must pass; each entry of the bad-spec
corpus must fail in one line that names the field, through the CLI before
anything is claimed, so that nothing is left behind.  No VM here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from capsa.cli.exec import load_process
from capsa.cli.main import main
from capsa.cli.spec import default_spec
from capsa.errors import BundleError, InvalidArgument
from capsa.runtime.bundle import load_bundle
from capsa.runtime.schema import CAPABILITIES, check_config, check_process, json_path

SPECS = Path(__file__).parent / "specs"
DEEP = 100_000

Spec = dict[str, Any]


def make_bundle(directory: Path, spec: Spec | str) -> Path:
    rootfs = directory / "rootfs" / "bin"
    rootfs.mkdir(parents=True, exist_ok=True)
    (rootfs / "sh").write_bytes(b"\x7fELF")
    (directory / "config.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return directory


def spec_with(change: Callable[[Spec], object]) -> Spec:
    spec = default_spec(["sh"], terminal=False)
    change(spec)
    return spec


def deep_array(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- what engines write passes ---------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.json")), ids=lambda p: p.stem)
def test_the_specs_engines_write_pass(path: Path) -> None:
    check_config(json.loads(path.read_text()), "config.json: ", BundleError)


def test_the_default_spec_loads(tmp_path: Path) -> None:
    bundle = load_bundle(make_bundle(tmp_path, default_spec(["sh"], terminal=False)))
    assert bundle.process["args"] == ["sh"]


# --- the bad-spec corpus: (what is wrong, the change, the field named, words of the problem) ---

CORPUS: list[tuple[str, Callable[[Spec], object], str, str]] = [
    ("uid-is-a-name", lambda s: s["process"]["user"].update(uid="root"), "process.user.uid", 'got "root"'),
    ("uid-negative", lambda s: s["process"]["user"].update(uid=-1), "process.user.uid", "out of range"),
    ("uid-2**70", lambda s: s["process"]["user"].update(uid=2**70), "process.user.uid", "out of range"),
    ("uid-1.5", lambda s: s["process"]["user"].update(uid=1.5), "process.user.uid", "expected an integer"),
    ("uid-true", lambda s: s["process"]["user"].update(uid=True), "process.user.uid", "expected an integer"),
    ("gid-string", lambda s: s["process"]["user"].update(gid="0"), "process.user.gid", "expected an integer"),
    (
        "additional-gid-negative",
        lambda s: s["process"]["user"].update(additionalGids=[5, -5]),
        "process.user.additionalGids[1]",
        "out of range",
    ),
    ("umask-string", lambda s: s["process"]["user"].update(umask="022"), "process.user.umask", "expected an integer"),
    ("capabilities-ALL", lambda s: s["process"].update(capabilities="ALL"), "process.capabilities", "an object"),
    (
        "capability-unknown",
        lambda s: s["process"]["capabilities"].update(bounding=["CAP_KILL", "CAP_NOPE"]),
        "process.capabilities.bounding[1]",
        'unknown capability "CAP_NOPE"',
    ),
    (
        "capability-lower-case",
        lambda s: s["process"]["capabilities"].update(ambient=["cap_kill"]),
        "process.capabilities.ambient[0]",
        "unknown capability",
    ),
    (
        "capability-set-a-string",
        lambda s: s["process"]["capabilities"].update(effective="CAP_KILL"),
        "process.capabilities.effective",
        "expected an array",
    ),
    ("mount-without-destination", lambda s: s["mounts"][1].pop("destination"), "mounts[1].destination", "missing"),
    ("mount-destination-number", lambda s: s["mounts"][0].update(destination=42), "mounts[0].destination", "a string"),
    ("mount-options-string", lambda s: s["mounts"][0].update(options="ro"), "mounts[0].options", "an array"),
    ("mounts-object", lambda s: s.update(mounts={"destination": "/x"}), "mounts", "expected an array"),
    ("annotation-integer", lambda s: s.update(annotations={"a": 1}), "annotations.a", "expected a string, got 1"),
    (
        "annotation-boolean",
        lambda s: s.update(annotations={"io.kubernetes.cri.sandbox-id": True}),
        'annotations["io.kubernetes.cri.sandbox-id"]',
        "got true",
    ),
    ("annotations-array", lambda s: s.update(annotations=["a=b"]), "annotations", "expected an object"),
    (
        "namespace-bogus",
        lambda s: s["linux"]["namespaces"].append({"type": "bogus"}),
        "linux.namespaces[6].type",
        '"bogus" is not one of',
    ),
    ("namespace-without-type", lambda s: s["linux"]["namespaces"].append({}), "linux.namespaces[6].type", "missing"),
    (
        "namespace-path-number",
        lambda s: s["linux"]["namespaces"][1].update(path=7),
        "linux.namespaces[1].path",
        "a string",
    ),
    (
        "namespace-twice",
        lambda s: s["linux"]["namespaces"].append({"type": "uts"}),
        "linux.namespaces[6].type",
        "a second 'uts' namespace",
    ),
    ("no-ociVersion", lambda s: s.pop("ociVersion"), "ociVersion", "missing"),
    ("ociVersion-number", lambda s: s.update(ociVersion=1.0), "ociVersion", "expected a string"),
    ("no-cwd", lambda s: s["process"].pop("cwd"), "process.cwd", "missing"),
    ("terminal-string", lambda s: s["process"].update(terminal="yes"), "process.terminal", "a boolean"),
    ("env-string", lambda s: s["process"].update(env="A=B"), "process.env", "expected an array"),
    ("env-number", lambda s: s["process"]["env"].append(7), "process.env[2]", "expected a string"),
    (
        "rlimit-lower-case",
        lambda s: s["process"]["rlimits"][0].update(type="RLIMIT_nofile"),
        "process.rlimits[0].type",
        "does not match",
    ),
    ("rlimit-negative", lambda s: s["process"]["rlimits"][0].update(hard=-1), "process.rlimits[0].hard", "range"),
    ("rlimit-no-soft", lambda s: s["process"]["rlimits"][0].pop("soft"), "process.rlimits[0].soft", "missing"),
    ("oomScoreAdj-string", lambda s: s["process"].update(oomScoreAdj="high"), "process.oomScoreAdj", "an integer"),
    ("hostname-number", lambda s: s.update(hostname=7), "hostname", "expected a string"),
    ("readonly-string", lambda s: s["root"].update(readonly="true"), "root.readonly", "a boolean"),
    (
        "memory-limit-string",
        lambda s: s["linux"]["resources"].update(memory={"limit": "1G"}),
        "linux.resources.memory.limit",
        'got "1G"',
    ),
    ("pids-without-limit", lambda s: s["linux"]["resources"].update(pids={}), "linux.resources.pids.limit", "missing"),
    (
        "device-rule-without-allow",
        lambda s: s["linux"]["resources"].update(devices=[{"access": "rwm"}]),
        "linux.resources.devices[0].allow",
        "missing",
    ),
    ("seccomp-without-action", lambda s: s["linux"].update(seccomp={}), "linux.seccomp.defaultAction", "missing"),
    (
        "seccomp-unknown-arch",
        lambda s: s["linux"].update(seccomp={"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_NOPE"]}),
        "linux.seccomp.architectures[0]",
        "is not one of",
    ),
    (
        "sysctl-number",
        lambda s: s["linux"].update(sysctl={"net.ipv4.ip_forward": 1}),
        'linux.sysctl["net.ipv4.ip_forward"]',
        "expected a string",
    ),
    (
        "uid-mapping-size-negative",
        lambda s: s["linux"].update(uidMappings=[{"containerID": 0, "hostID": 1000, "size": -1}]),
        "linux.uidMappings[0].size",
        "out of range",
    ),
    (
        "device-type",
        lambda s: s["linux"].update(devices=[{"path": "/dev/x", "type": "x"}]),
        "linux.devices[0].type",
        "does not match",
    ),
    (
        "propagation-bogus",
        lambda s: s["linux"].update(rootfsPropagation="bogus"),
        "linux.rootfsPropagation",
        "is not one of",
    ),
    ("hook-without-path", lambda s: s.update(hooks={"prestart": [{"args": []}]}), "hooks.prestart[0].path", "missing"),
    (
        "hook-timeout-zero",
        lambda s: s.update(hooks={"poststop": [{"path": "/x", "timeout": 0}]}),
        "hooks.poststop[0].timeout",
        "less than the minimum 1",
    ),
]


@pytest.mark.parametrize(("what", "change", "field", "words"), CORPUS, ids=[c[0] for c in CORPUS])
def test_a_bad_spec_is_refused_naming_the_field(
    tmp_path: Path, what: str, change: Callable[[Spec], object], field: str, words: str
) -> None:
    bundle = make_bundle(tmp_path, spec_with(change))
    with pytest.raises(BundleError) as refused:
        load_bundle(bundle)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{bundle / 'config.json'}: {field}: "), message
    assert words in message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (deep_array(DEEP), "nested too deeply"),
        ('{"ociVersion": "1.0.2", "x": ' + deep_array(DEEP) + "}", "nested too deeply"),
        # Parses, but deeper than anything that walks the spec later should meet.
        ('{"ociVersion": "1.0.2", "x": ' + deep_array(200) + "}", "nested too deeply (more than 128 levels"),
        ('{"ociVersion": "1.0.2", "process": {"user": {"uid": ' + "9" * 5000 + "}}}", "not valid JSON"),
        ('{"ociVersion": "1.0.2", "process": {"user": {"uid": NaN}}}', "not valid JSON: NaN is not a JSON value"),
        ('{"ociVersion": "1.0.2", "x": Infinity}', "not valid JSON"),
    ],
    ids=["100000-deep", "100000-deep-inside", "200-deep", "5000-digits", "NaN", "Infinity"],
)
def test_json_that_python_would_choke_on_is_one_error(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(BundleError) as refused:
        load_bundle(make_bundle(tmp_path, text))
    assert "\n" not in str(refused.value)
    assert words in str(refused.value)


def test_every_capability_crun_knows_passes() -> None:
    spec = spec_with(lambda s: s["process"].update(capabilities={"bounding": list(CAPABILITIES)}))
    check_config(spec, "", BundleError)
    assert len(CAPABILITIES) == 41  # 0 (CAP_CHOWN) to 40 (CAP_CHECKPOINT_RESTORE)


@pytest.mark.parametrize(
    ("parts", "path"),
    [
        ([], "(top level)"),
        (["process", "user", "uid"], "process.user.uid"),
        (["mounts", 2, "destination"], "mounts[2].destination"),
        (["annotations", "io.k8s/x"], 'annotations["io.k8s/x"]'),
    ],
)
def test_json_path(parts: list[str | int], path: str) -> None:
    assert json_path(parts) == path


# --- exec --process ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("process", "field", "words"),
    [
        ({"args": ["sh"], "user": {"uid": "root"}}, "user.uid", "expected an integer"),
        ({"args": ["sh"], "user": {"uid": 0, "gid": 2**32}}, "user.gid", "out of range"),
        ({"args": ["sh"], "capabilities": "ALL"}, "capabilities", "expected an object"),
        ({"args": ["sh"], "capabilities": {"bounding": ["CAP_NOPE"]}}, "capabilities.bounding[0]", "unknown"),
        ({"args": ["sh"], "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1}]}, "rlimits[0].hard", "missing"),
        ({"args": ["sh"], "terminal": 1}, "terminal", "a boolean"),
    ],
)
def test_a_bad_process_file_is_refused_naming_the_field(tmp_path: Path, process: Spec, field: str, words: str) -> None:
    path = tmp_path / "process.json"
    path.write_text(json.dumps(process))
    with pytest.raises(InvalidArgument) as refused:
        load_process(path)
    assert str(refused.value).startswith(f"--process {path}: {field}: ")
    assert words in str(refused.value)


def test_a_process_file_nested_100000_deep(tmp_path: Path) -> None:
    path = tmp_path / "process.json"
    path.write_text('{"args": ["sh"], "x": ' + deep_array(DEEP) + "}")
    with pytest.raises(InvalidArgument, match=r"^--process .*: nested too deeply"):
        load_process(path)


def test_a_process_file_without_cwd_runs_in_the_root_as_before(tmp_path: Path) -> None:
    path = tmp_path / "process.json"
    path.write_text('{"args": ["sh"], "user": {"uid": 1000, "gid": 1000}}')
    assert load_process(path)["args"] == ["sh"]


def test_exec_flags_are_checked_as_a_process_file_is() -> None:
    """``exec --user 4294967296 --cap CAP_NOPE``: what build_process made of the flags."""
    with pytest.raises(InvalidArgument, match=r"^exec: user\.uid: 4294967296 is out of range"):
        check_process({"args": ["sh"], "user": {"uid": 2**32, "gid": 0}}, "exec: ", InvalidArgument)
    with pytest.raises(InvalidArgument, match=r"^exec: capabilities\.bounding\[0\]: unknown capability"):
        check_process({"args": ["sh"], "capabilities": {"bounding": ["CAP_NOPE"]}}, "exec: ", InvalidArgument)


# --- through the command line: one line, non-zero, nothing left behind --------------------------


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A configuration that forces TCG, so nothing probes KVM."""
    path = tmp_path / "configuration.toml"
    path.write_text('[hypervisor]\naccelerator = "tcg"\n')
    monkeypatch.setenv("CAPSA_CONFIG", str(path))
    return path


def assert_one_line(code: int, out: str, err: str, *words: str) -> None:
    assert code != 0
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("capsa: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def assert_nothing_left(root: Path) -> None:
    assert not root.exists() or list(root.iterdir()) == []
    mine = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if os.fsencode(root) in cmdline and int(pid) != os.getpid():
            mine.append(cmdline)
    assert mine == []


@pytest.mark.parametrize("verb", ["create", "run"])
@pytest.mark.parametrize(("what", "change", "field", "words"), CORPUS, ids=[c[0] for c in CORPUS])
def test_the_cli_refuses_the_corpus_before_it_claims_the_id(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    config: Path,
    verb: str,
    what: str,
    change: Callable[[Spec], object],
    field: str,
    words: str,
) -> None:
    bundle = make_bundle(tmp_path / "bundle", spec_with(change))
    root = tmp_path / "root"
    code = main(["--root", str(root), verb, "--bundle", str(bundle), "bad"])
    out, err = capsys.readouterr()
    assert_one_line(code, out, err, f"{field}: ", words)
    assert_nothing_left(root)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (deep_array(DEEP), "config.json: nested too deeply"),
        (json.dumps(spec_with(lambda s: s["process"]["user"].update(uid="root"))), "process.user.uid: expected"),
        (json.dumps(spec_with(lambda s: s["process"].update(capabilities="ALL"))), "process.capabilities: expected"),
    ],
    ids=["100000-deep", "uid-root", "capabilities-ALL"],
)
def test_a_real_capsa_process_prints_one_line(tmp_path: Path, config: Path, content: str, words: str) -> None:
    """In a capsa of its own (the interpreter's real recursion limit and stack, stderr as the user sees it)."""
    bundle = make_bundle(tmp_path / "bundle", content)
    root = tmp_path / "root"
    result = subprocess.run(
        [sys.executable, "-m", "capsa", "--root", str(root), "create", "--bundle", str(bundle), "bad"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CAPSA_CONFIG": str(config)},
    )
    assert_one_line(result.returncode, result.stdout, result.stderr, words)
    assert_nothing_left(root)


def test_exec_process_file_nested_100000_deep_through_the_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, config: Path
) -> None:
    process = tmp_path / "process.json"
    process.write_text(deep_array(DEEP))
    code = main(["--root", str(tmp_path / "root"), "exec", "--process", str(process), "nosuch"])
    out, err = capsys.readouterr()
    assert_one_line(code, out, err, "--process", "nested too deeply")


def test_update_resources_nested_100000_deep_through_the_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, config: Path
) -> None:
    resources = tmp_path / "resources.json"
    resources.write_text(deep_array(DEEP))
    code = main(["--root", str(tmp_path / "root"), "update", "--resources", str(resources), "nosuch"])
    out, err = capsys.readouterr()
    assert_one_line(code, out, err, "--resources", "nested too deeply")


def test_an_unexpected_exception_is_one_line_and_debug_shows_the_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug still meets the user as one line; ``--debug`` adds the traceback for whoever reports it."""

    def broken(*args: object) -> int:
        raise KeyError("surprise")

    monkeypatch.setattr("capsa.cli.version.execute", broken)
    code = main(["version"])
    out, err = capsys.readouterr()
    assert_one_line(code, out, err, "internal error: KeyError: 'surprise'")
    assert main(["--debug", "version"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.splitlines()[-1] == "capsa: internal error: KeyError: 'surprise'"


@pytest.mark.parametrize("propagation", ["rslave", "rprivate", "rshared", "runbindable", "slave"])
def test_rootfs_propagation_takes_what_runc_takes(propagation: str) -> None:
    # Podman 4.3 writes linux.rootfsPropagation "rslave" for a -v SRC:DST:rslave volume.
    from capsa.cli.spec import default_spec
    from capsa.errors import BundleError
    from capsa.runtime.schema import check_config

    spec = default_spec(["true"], terminal=False)
    spec["linux"]["rootfsPropagation"] = propagation
    check_config(spec, "", BundleError)
