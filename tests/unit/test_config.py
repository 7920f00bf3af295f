from pathlib import Path

import pytest

from capsa.config import Config, load_config, max_memory_mib_for, max_vcpus_for, parse_config
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
        ('[hypervisor]\ninitrd = ""\nimage = ""\n', r"hypervisor: set one of initrd or image"),
        ("[agent]\nconnect_timeout = -1\n", r"agent\.connect_timeout: expected a positive number"),
        ('[shared_fs]\nkind = "nfs"\n', r"shared_fs\.kind"),
        ("[shared_fs]\nvirtiofs_volume_timeout = -1\n", r"shared_fs\.virtiofs_volume_timeout: expected a number"),
        ('[shared_fs]\nvirtiofs_volume_timeout = "0"\n', r"shared_fs\.virtiofs_volume_timeout: expected a number"),
        ("[gpu]\nx = 1\n", r"gpu: unknown section"),
        ('[runtime]\ndebug = "yes"\n', r"runtime\.debug: expected true or false"),
        ('[hypervisor]\nboot = "warm"\n', r"hypervisor\.boot: expected one of 'cold', 'template'"),
        ("[hypervisor\n", r"not valid TOML"),
        ("[hypervisor]\nmax_vcpus = 500\n", r"hypervisor\.max_vcpus: expected an integer from 0 to 240"),
        ("[hypervisor]\ndefault_vcpus = 4\nmax_vcpus = 2\n", r"hypervisor\.max_vcpus: 2 is less than default_vcpus"),
        ("[hypervisor]\nmax_memory_mib = 512\n", r"hypervisor\.max_memory_mib: 512 is less than default_memory_mib"),
        ('[hypervisor]\nmax_memory_mib = "4G"\n', r"hypervisor\.max_memory_mib: expected an integer"),
        ("[hypervisor]\ntemplate_max_clones = -1\n", r"hypervisor\.template_max_clones: expected an integer from 0"),
        ("[hypervisor]\ntemplate_max_age = -5\n", r"hypervisor\.template_max_age: expected a number of seconds"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(str(path))
    assert str(info.value).startswith(str(path))


def test_volume_timeout_defaults_to_zero_and_takes_fractions() -> None:
    assert parse_config({}).shared_fs.virtiofs_volume_timeout == 0.0
    assert parse_config({"shared_fs": {"virtiofs_volume_timeout": 0.25}}).shared_fs.virtiofs_volume_timeout == 0.25


def test_image_instead_of_initrd() -> None:
    config = parse_config({"hypervisor": {"initrd": "", "image": "/var/lib/capsa/guest/rootfs.img"}})
    assert config.hypervisor.initrd is None
    assert config.hypervisor.image == Path("/var/lib/capsa/guest/rootfs.img")


def test_guest_dir_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSA_GUEST_DIR", "/opt/guest")
    assert Config().hypervisor.kernel == Path("/opt/guest/bzImage")


def test_boot_mode() -> None:
    assert Config().hypervisor.boot == "template"
    assert parse_config({"hypervisor": {"boot": "cold"}}).hypervisor.boot == "cold"


def test_templates_are_bounded_by_default_and_the_bounds_can_be_lifted() -> None:
    hv = Config().hypervisor
    assert (hv.template_max_clones, hv.template_max_age) == (100, 86400.0)
    lifted = parse_config({"hypervisor": {"template_max_clones": 0, "template_max_age": 0}}).hypervisor
    assert (lifted.template_max_clones, lifted.template_max_age) == (0, 0.0)
    assert parse_config({"hypervisor": {"template_max_age": 1.5}}).hypervisor.template_max_age == 1.5


def test_hotplug_maxima_default_to_the_host() -> None:
    hv = Config().hypervisor
    assert (hv.max_vcpus, hv.max_memory_mib) == (0, 0)
    assert max_vcpus_for(hv, host_cpus=8) == 8
    assert max_vcpus_for(hv, host_cpus=1000) == 240  # QEMU's q35 limit
    assert max_memory_mib_for(hv, host_memory_mib=65536) == 4 * 1024  # 4x default_memory_mib
    assert max_memory_mib_for(hv, host_memory_mib=2048) == 2048  # capped by the host's RAM
    assert max_memory_mib_for(hv, host_memory_mib=512) == 1024  # never below the boot size


def test_hotplug_maxima_from_the_file() -> None:
    hv = parse_config({"hypervisor": {"default_vcpus": 2, "max_vcpus": 4, "max_memory_mib": 8192}}).hypervisor
    assert max_vcpus_for(hv, host_cpus=1) == 4
    assert max_memory_mib_for(hv, host_memory_mib=1024) == 8192
    # A host with fewer CPUs than a VM starts with still gets that VM.
    assert max_vcpus_for(parse_config({"hypervisor": {"default_vcpus": 4}}).hypervisor, host_cpus=2) == 4


def test_confinement_is_on_by_default_and_each_measure_can_be_turned_off() -> None:
    from capsa.config import parse_config

    security = parse_config({}).security
    assert (security.unprivileged_vmm, security.jail, security.cgroup_limits) == (True, True, True)
    off = parse_config({"security": {"jail": False, "cgroup_limits": False}}).security
    assert (off.unprivileged_vmm, off.jail, off.cgroup_limits) == (True, False, False)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"sandbox_id_base": 0}, "security.sandbox_id_base: expected an integer from 65536"),
        ({"sandbox_id_base": 4294967000, "sandbox_id_count": 1000}, "security.sandbox_id_count: the range ends"),
        ({"unprivileged_vmm": False}, "security.jail: needs unprivileged_vmm = true"),
        ({"selinux": True}, "security.selinux: unknown key"),
    ],
)
def test_bad_security_settings_name_the_key(table: dict[str, object], message: str) -> None:
    from capsa.config import parse_config
    from capsa.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_config({"security": table})
