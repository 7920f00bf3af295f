import json
import os
from pathlib import Path
from typing import Any

import pytest

from capsa.cli.spec import default_spec
from capsa.errors import BundleError, InvalidArgument
from capsa.runtime.bundle import load_bundle, resolve_in_rootfs
from capsa.runtime.ids import validate_id


def make_bundle(tmp_path: Path, spec: Any = None, args: list[str] | None = None) -> Path:
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin" / "busybox").write_bytes(b"\x7fELF")
    os.symlink("busybox", rootfs / "bin" / "sh")
    os.symlink("/bin", rootfs / "sbin")
    if spec is None:
        spec = default_spec(args or ["sh", "-c", "true"], terminal=False)
    (tmp_path / "config.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return tmp_path


def test_good_bundle(tmp_path: Path) -> None:
    bundle = load_bundle(make_bundle(tmp_path))
    assert bundle.rootfs == tmp_path / "rootfs"
    assert bundle.process["args"] == ["sh", "-c", "true"]
    assert not bundle.terminal


def test_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such directory"):
        load_bundle(tmp_path / "nope")


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"config\.json: no such file"):
        load_bundle(tmp_path)


def test_config_not_json(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"not valid JSON: .* line 1"):
        load_bundle(make_bundle(tmp_path, spec="{not json"))


def test_spec_without_process(tmp_path: Path) -> None:
    spec = default_spec()
    del spec["process"]
    with pytest.raises(BundleError, match="process: missing"):
        load_bundle(make_bundle(tmp_path, spec=spec))


@pytest.mark.parametrize("args", [[], "sh", [1, 2], [""]])
def test_bad_args(tmp_path: Path, args: Any) -> None:
    spec = default_spec()
    spec["process"]["args"] = args
    with pytest.raises(BundleError, match=r"process\.args"):
        load_bundle(make_bundle(tmp_path, spec=spec))


def test_missing_rootfs(tmp_path: Path) -> None:
    make_bundle(tmp_path)
    spec = default_spec(["sh"])
    spec["root"]["path"] = "elsewhere"
    (tmp_path / "config.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match=r"root\.path: .*elsewhere: no such directory"):
        load_bundle(tmp_path)


def test_executable_not_in_path(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"executable file not found in \$PATH"):
        load_bundle(make_bundle(tmp_path, args=["nosuch"]))


def test_executable_by_absolute_path_through_symlinks(tmp_path: Path) -> None:
    load_bundle(make_bundle(tmp_path, args=["/sbin/sh"]))
    with pytest.raises(BundleError, match="no such file"):
        load_bundle(make_bundle(tmp_path / "b", args=["/sbin/nosuch"]))


def test_absolute_symlinks_stay_inside_rootfs(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    os.symlink("/etc/passwd", rootfs / "escape")  # the host has one; the rootfs does not
    assert resolve_in_rootfs(rootfs, "/escape") is None
    assert resolve_in_rootfs(rootfs, "/../../etc") == rootfs / "etc"


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../x", "x\x00y", "a b", "é"])
def test_bad_ids(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_id(bad)


@pytest.mark.parametrize("good", ["abc", "a.b-c_d+e", "0" * 64])
def test_good_ids(good: str) -> None:
    assert validate_id(good) == good
