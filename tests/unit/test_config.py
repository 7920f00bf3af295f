from pathlib import Path

import pytest

from capsa.config import Config, load_config, parse_config
from capsa.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "configuration.toml"
    path.write_text(text)
    return path


def test_shipped_example_is_the_defaults() -> None:
    shipped = load_config(str(REPO / "config" / "configuration.toml"))
    assert shipped.hypervisor == Config().hypervisor
    assert shipped.shared_fs == Config().shared_fs
    assert shipped.agent == Config().agent


def test_missing_default_file_gives_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CAPSA_CONFIG", raising=False)
    monkeypatch.setattr("capsa.config.DEFAULT_CONFIG_PATH", tmp_path / "nope.toml")
    assert load_config() == Config()


def test_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"))


def test_environment_variable_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, "[hypervisor]\ndefault_vcpus = 2\n")
    monkeypatch.setenv("CAPSA_CONFIG", str(path))
    config = load_config()
    assert config.hypervisor.default_vcpus == 2
    assert config.source == path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[hypervisor]\ndefault_vcpus = "two"\n', r"hypervisor\.default_vcpus: expected an integer"),
        ('[hypervisor]\naccelerator = "xen"\n', r"hypervisor\.accelerator: expected one of 'auto', 'kvm', 'tcg'"),
        ('[hypervisor]\nkernel = "relative/vmlinux"\n', r"hypervisor\.kernel: expected an absolute path"),
        ("[hypervisor]\nvcpus = 2\n", r"hypervisor\.vcpus: unknown key"),
        ('[hypervisor]\ninitrd = ""\n', r"hypervisor: set one of initrd or image"),
        ("[agent]\nconnect_timeout = -1\n", r"agent\.connect_timeout: expected a positive number"),
        ('[shared_fs]\nkind = "nfs"\n', r"shared_fs\.kind"),
        ("[gpu]\nx = 1\n", r"gpu: unknown section"),
        ('[runtime]\ndebug = "yes"\n', r"runtime\.debug: expected true or false"),
        ('[hypervisor]\nboot = "warm"\n', r"hypervisor\.boot: expected one of 'cold', 'template'"),
        ("[hypervisor\n", r"not valid TOML"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(str(path))
    assert str(info.value).startswith(str(path))


def test_image_instead_of_initrd() -> None:
    config = parse_config({"hypervisor": {"initrd": "", "image": "/var/lib/capsa/guest/rootfs.img"}})
    assert config.hypervisor.initrd is None
    assert config.hypervisor.image == Path("/var/lib/capsa/guest/rootfs.img")


def test_guest_dir_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSA_GUEST_DIR", "/opt/guest")
    assert Config().hypervisor.kernel == Path("/opt/guest/vmlinux")


def test_boot_mode() -> None:
    assert Config().hypervisor.boot == "template"
    assert parse_config({"hypervisor": {"boot": "cold"}}).hypervisor.boot == "cold"
