"""The capsa configuration: one TOML file, validated when it is loaded.

Where it comes from, first match wins: the ``--config`` flag, the
``CAPSA_CONFIG`` environment variable, ``/etc/capsa/configuration.toml``.
A missing default file is not an error (the shipped defaults work out of the
box); a file named by flag or variable must exist.  Every problem names the
file and the key, e.g. ``/etc/capsa/configuration.toml: hypervisor.default_vcpus:
expected an integer from 1 to 240, got "two"``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from capsa.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/capsa/configuration.toml")
CONFIG_ENV = "CAPSA_CONFIG"
GUEST_DIR_ENV = "CAPSA_GUEST_DIR"
DEFAULT_GUEST_DIR = Path("/var/lib/capsa/guest")
CACHE_DIR_ENV = "CAPSA_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("/var/cache/capsa")

ACCELERATORS = ("auto", "kvm", "tcg")
MACHINE_TYPES = ("q35", "microvm")
SHARED_FS_KINDS = ("virtio-fs", "virtio-9p")
AGENT_CHANNELS = ("auto", "vsock", "serial")
BOOT_MODES = ("cold", "template")
#: When a template clone's agent replaces itself with a fresh process (RenewAgent).
RENEW_AGENT_MODES = ("auto", "always", "never")
NETWORK_MODELS = ("tcfilter", "macvtap", "none")
#: QEMU's q35 limit without an IOMMU with x2APIC interrupt remapping.
MAX_VCPUS = 240
#: Without max_memory_mib, a VM may grow to this many times default_memory_mib.
DEFAULT_MAX_MEMORY_FACTOR = 4


def guest_dir() -> Path:
    """Where the image builders install the guest kernel and image."""
    return Path(os.environ.get(GUEST_DIR_ENV) or DEFAULT_GUEST_DIR)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)


def max_vcpus_for(hv: HypervisorConfig, host_cpus: int) -> int:
    """The most vCPUs a VM may grow to: ``max_vcpus``, else the host's CPUs; pure.

    Never below ``default_vcpus`` (a VM starts with that many) nor above
    :data:`MAX_VCPUS`.  More vCPUs than host CPUs only adds contention.
    """
    wanted = hv.max_vcpus or host_cpus
    return max(hv.default_vcpus, min(wanted, MAX_VCPUS))


def max_memory_mib_for(hv: HypervisorConfig, host_memory_mib: int) -> int:
    """The most RAM a VM may grow to: ``max_memory_mib``, else
    :data:`DEFAULT_MAX_MEMORY_FACTOR` times ``default_memory_mib`` capped by
    the host's RAM; never below ``default_memory_mib``.  Pure."""
    wanted = hv.max_memory_mib or min(DEFAULT_MAX_MEMORY_FACTOR * hv.default_memory_mib, host_memory_mib)
    return max(hv.default_memory_mib, wanted)


def host_cpus() -> int:
    """CPUs this process may run on (sched_getaffinity(2)), the host's for a VM's purposes."""
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


def host_memory_mib() -> int:
    """The host's physical RAM (sysconf(3) _SC_PHYS_PAGES x _SC_PAGE_SIZE)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20


@dataclass(frozen=True)
class HypervisorConfig:
    path: Path = Path("/usr/bin/qemu-system-x86_64")
    machine_type: str = "q35"
    accelerator: str = "auto"
    # The bzImage, not the PVH vmlinux: its decompressor randomises where the
    # kernel runs (KASLR); the PVH entry skips it (docs/architecture.md).
    kernel: Path = field(default_factory=lambda: guest_dir() / "bzImage")
    initrd: Path | None = field(default_factory=lambda: guest_dir() / "initrd.img")
    # The guest's root: an erofs image mapped read-only through virtio-pmem
    # and mounted with DAX, so N guests share one copy of it in the host's
    # page cache; wins over the initrd, which every guest would unpack into
    # its own RAM (docs/performance.md, "Density").
    image: Path | None = field(default_factory=lambda: guest_dir() / "rootfs.img")
    kernel_params: tuple[str, ...] = ()
    firmware: Path | None = None
    default_vcpus: int = 1
    default_memory_mib: int = 1024
    # How far `capsa update` may grow a VM by CPU and memory hot-plug; 0
    # picks the default (see max_vcpus_for / max_memory_mib_for).
    max_vcpus: int = 0
    max_memory_mib: int = 0
    extra_args: tuple[str, ...] = ()
    # template: restore a saved, booted VM (capsa.hypervisor.template),
    # booting cold whenever that fails; cold: boot every VM.  Template is
    # the default: under TCG it starts a sandbox in ~0.45x the time.
    boot: str = "template"
    # A template's clones share its KASLR layout and boot-time secrets
    # (capsa.hypervisor.template): one serves at most this many sandboxes and
    # this many seconds, then the next sandbox makes a fresh one; 0: no bound.
    template_max_clones: int = 100
    template_max_age: float = 86400.0
    # A clone's agent is its template's process, hash seed, stack canary and
    # PRNG states included, unless it renews itself (RenewAgent: a fresh
    # /init) right after the restore.  auto: under KVM, where that costs tens
    # of milliseconds; not under TCG, where renewing takes about 1.1 s per
    # sandbox (docs/performance.md); always; never.
    template_renew_agent: str = "auto"
    # The guest reports the pages it frees (virtio-balloon free page
    # reporting) and the host takes them back: a template's freed initrd
    # leaves every clone's copy, and what a container frees leaves the host.
    free_page_reporting: bool = True


@dataclass(frozen=True)
class SharedFsConfig:
    kind: str = "virtio-fs"
    virtiofsd_path: Path = Path("/usr/lib/qemu/virtiofsd")
    # auto, not none: none breaks mmap(MAP_SHARED) of writable files and is
    # slower on metadata; always never shows host changes to volumes
    # (bench/fsmeta.py, docs/performance.md).
    virtiofs_cache: str = "auto"
    # Seconds the guest may keep entries and attributes of *bind volumes*
    # (virtiofsd's -o timeout= on the second share, which serves the spec's
    # host binds while the rootfs share keeps virtiofs_cache's own 1 s).  0:
    # a host change (an append, a deletion) is seen by the very next access,
    # never torn or late; mmap(MAP_SHARED) still works (cache=auto).  It costs
    # the volumes cache=none's metadata speed (docs/performance.md).
    virtiofs_volume_timeout: float = 0.0


@dataclass(frozen=True)
class AgentConfig:
    channel: str = "auto"
    # Generous: a cold boot under TCG takes about a second, but a loaded
    # CI machine can stretch that many times over.
    connect_timeout: float = 60.0
    request_timeout: float = 60.0
    vsock_port: int = 1024
    #: An agent policy document (TOML, docs/agent-policy.md) set in every
    #: sandbox before its first container; None: the guest image's own
    #: policy (allow everything unless the image carries one).
    policy: Path | None = None


@dataclass(frozen=True)
class RuntimeConfig:
    debug: bool = False
    #: Admission: a VM starts only if the host's MemAvailable, less this
    #: reserve, holds its guest memory (runtime/admission.py).  0 turns the check off.
    host_memory_reserve_mib: int = 1024
    #: `capsa debug-console` may open a shell in the guests created while it
    #: is true (runtime/debug_console.py).
    debug_console: bool = False


@dataclass(frozen=True)
class NetworkConfig:
    # How the VM's NIC joins the engine's network namespace
    # (capsa.network.attach): tcfilter, a tap mirrored to the veth with tc;
    # macvtap, a passthru macvtap on the veth; none, no NIC at all.
    model: str = "tcfilter"


#: The default range of host uids (and gids, the same numbers) handed out to
#: sandboxes, one each: far above any uid a distribution or ``/etc/subuid``
#: hands out (those stay below 2^31 - 2^24), and below 2^31 so no tool that
#: reads ids as signed 32-bit numbers sees a negative one.
DEFAULT_SANDBOX_ID_BASE = 2_130_000_000
DEFAULT_SANDBOX_ID_COUNT = 65_536


@dataclass(frozen=True)
class SecurityConfig:
    """How each sandbox's host side is confined (docs/architecture.md, "Confinement").

    Every measure is on by default; turning one off is a documented risk.
    """

    #: Run QEMU as a uid and gid of its own, from this range, with no
    #: capabilities: a QEMU escape lands in an unprivileged process.
    sandbox_id_base: int = DEFAULT_SANDBOX_ID_BASE
    sandbox_id_count: int = DEFAULT_SANDBOX_ID_COUNT
    #: QEMU as its sandbox's own uid with no capabilities (false: as root, the risk
    #: is that one QEMU device bug is root on the host).
    unprivileged_vmm: bool = True
    #: QEMU in its own mount namespace rooted in a jail holding only its
    #: files, and in its own PID and IPC namespaces (false: it sees the host's
    #: whole file system, processes and System V IPC).
    jail: bool = True
    #: Host cgroup limits (memory, pids, CPU) on each sandbox's host processes
    #: (false: accounting only; a runaway VMM can take the host's memory).
    cgroup_limits: bool = True


@dataclass(frozen=True)
class Config:
    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    shared_fs: SharedFsConfig = field(default_factory=SharedFsConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    source: Path | None = None  # the file it came from; None for built-in defaults


def resolve_config_path(flag: str | None) -> tuple[Path, bool]:
    """The file to read and whether it must exist (named explicitly)."""
    if flag:
        return Path(flag), True
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


def load_config(flag: str | None = None) -> Config:
    path, required = resolve_config_path(flag)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: configuration file does not exist") from None
        return Config()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(data, path)


def parse_config(data: Mapping[str, Any], path: Path | None = None) -> Config:
    """Build a :class:`Config` from parsed TOML, checking every key."""
    where = str(path) if path else "configuration"
    sections: dict[str, Any] = {}
    parsers: dict[str, Callable[[Mapping[str, Any], str], Any]] = {
        "hypervisor": _parse_hypervisor,
        "shared_fs": _parse_shared_fs,
        "agent": _parse_agent,
        "runtime": _parse_runtime,
        "network": _parse_network,
        "security": _parse_security,
    }
    for name, value in data.items():
        if name not in parsers:
            raise ConfigError(f"{where}: {name}: unknown section (known: {', '.join(parsers)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name}: expected a table")
        sections[name] = parsers[name](value, f"{where}: {name}")
    config = Config(**sections, source=path)
    if config.hypervisor.initrd is None and config.hypervisor.image is None:
        raise ConfigError(f"{where}: hypervisor: set one of initrd or image")
    return config


T = TypeVar("T")


class _Table:
    """Reads typed keys out of one TOML table, naming the key in every error."""

    def __init__(self, table: Mapping[str, Any], where: str, known: type) -> None:
        self.table = table
        self.where = where
        allowed = {f.name for f in fields(known)}
        for key in table:
            if key not in allowed:
                raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(allowed))})")

    def _fail(self, key: str, expected: str) -> ConfigError:
        return ConfigError(f"{self.where}.{key}: expected {expected}, got {self.table[key]!r}")

    def get(self, key: str, default: T, convert: Callable[[str, Any], T]) -> T:
        if key not in self.table:
            return default
        return convert(key, self.table[key])

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        def convert(k: str, v: Any) -> str:
            if v not in choices:
                raise self._fail(k, "one of " + ", ".join(repr(c) for c in choices))
            return str(v)

        return self.get(key, default, convert)

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        def convert(k: str, v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise self._fail(k, f"an integer from {lo} to {hi}")
            return v

        return self.get(key, default, convert)

    def seconds(self, key: str, default: float) -> float:
        def convert(k: str, v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                raise self._fail(k, "a positive number of seconds")
            return float(v)

        return self.get(key, default, convert)

    def non_negative_seconds(self, key: str, default: float) -> float:
        def convert(k: str, v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < float("inf"):
                raise self._fail(k, "a number of seconds, 0 or more")
            return float(v)

        return self.get(key, default, convert)

    def boolean(self, key: str, default: bool) -> bool:
        def convert(k: str, v: Any) -> bool:
            if not isinstance(v, bool):
                raise self._fail(k, "true or false")
            return v

        return self.get(key, default, convert)

    def path(self, key: str, default: Path) -> Path:
        def convert(k: str, v: Any) -> Path:
            if not isinstance(v, str) or not v.startswith("/"):
                raise self._fail(k, "an absolute path")
            return Path(v)

        return self.get(key, default, convert)

    def optional_path(self, key: str, default: Path | None) -> Path | None:
        """An absolute path, or "" for none."""

        def convert(k: str, v: Any) -> Path | None:
            if v == "":
                return None
            if not isinstance(v, str) or not v.startswith("/"):
                raise self._fail(k, 'an absolute path or ""')
            return Path(v)

        return self.get(key, default, convert)

    def strings(self, key: str) -> tuple[str, ...]:
        def convert(k: str, v: Any) -> tuple[str, ...]:
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise self._fail(k, "a list of strings")
            return tuple(v)

        return self.get(key, (), convert)


def _parse_hypervisor(table: Mapping[str, Any], where: str) -> HypervisorConfig:
    t = _Table(table, where, HypervisorConfig)
    d = HypervisorConfig()
    hv = HypervisorConfig(
        path=t.path("path", d.path),
        machine_type=t.choice("machine_type", d.machine_type, MACHINE_TYPES),
        accelerator=t.choice("accelerator", d.accelerator, ACCELERATORS),
        kernel=t.path("kernel", d.kernel),
        initrd=t.optional_path("initrd", d.initrd),
        image=t.optional_path("image", d.image),
        kernel_params=t.strings("kernel_params"),
        firmware=t.optional_path("firmware", d.firmware),
        default_vcpus=t.integer("default_vcpus", d.default_vcpus, 1, MAX_VCPUS),
        default_memory_mib=t.integer("default_memory_mib", d.default_memory_mib, 128, 1 << 20),
        max_vcpus=t.integer("max_vcpus", d.max_vcpus, 0, MAX_VCPUS),
        max_memory_mib=t.integer("max_memory_mib", d.max_memory_mib, 0, 1 << 22),
        extra_args=t.strings("extra_args"),
        boot=t.choice("boot", d.boot, BOOT_MODES),
        template_max_clones=t.integer("template_max_clones", d.template_max_clones, 0, 1 << 31),
        template_max_age=t.non_negative_seconds("template_max_age", d.template_max_age),
        template_renew_agent=t.choice("template_renew_agent", d.template_renew_agent, RENEW_AGENT_MODES),
        free_page_reporting=t.boolean("free_page_reporting", d.free_page_reporting),
    )
    if hv.max_vcpus and hv.max_vcpus < hv.default_vcpus:
        raise ConfigError(f"{where}.max_vcpus: {hv.max_vcpus} is less than default_vcpus ({hv.default_vcpus})")
    if hv.max_memory_mib and hv.max_memory_mib < hv.default_memory_mib:
        raise ConfigError(
            f"{where}.max_memory_mib: {hv.max_memory_mib} is less than default_memory_mib ({hv.default_memory_mib})"
        )
    return hv


def _parse_shared_fs(table: Mapping[str, Any], where: str) -> SharedFsConfig:
    t = _Table(table, where, SharedFsConfig)
    d = SharedFsConfig()
    return SharedFsConfig(
        kind=t.choice("kind", d.kind, SHARED_FS_KINDS),
        virtiofsd_path=t.path("virtiofsd_path", d.virtiofsd_path),
        virtiofs_cache=t.choice("virtiofs_cache", d.virtiofs_cache, ("auto", "always", "none")),
        virtiofs_volume_timeout=t.non_negative_seconds("virtiofs_volume_timeout", d.virtiofs_volume_timeout),
    )


def _parse_agent(table: Mapping[str, Any], where: str) -> AgentConfig:
    t = _Table(table, where, AgentConfig)
    d = AgentConfig()
    return AgentConfig(
        channel=t.choice("channel", d.channel, AGENT_CHANNELS),
        connect_timeout=t.seconds("connect_timeout", d.connect_timeout),
        request_timeout=t.seconds("request_timeout", d.request_timeout),
        vsock_port=t.integer("vsock_port", d.vsock_port, 1, 0xFFFFFFFE),
        policy=t.optional_path("policy", d.policy),
    )


def _parse_runtime(table: Mapping[str, Any], where: str) -> RuntimeConfig:
    t = _Table(table, where, RuntimeConfig)
    return RuntimeConfig(
        debug=t.boolean("debug", RuntimeConfig.debug),
        host_memory_reserve_mib=t.integer(
            "host_memory_reserve_mib", RuntimeConfig.host_memory_reserve_mib, 0, 1 << 24
        ),
        debug_console=t.boolean("debug_console", RuntimeConfig.debug_console),
    )


def _parse_network(table: Mapping[str, Any], where: str) -> NetworkConfig:
    t = _Table(table, where, NetworkConfig)
    return NetworkConfig(model=t.choice("model", NetworkConfig.model, NETWORK_MODELS))


def _parse_security(table: Mapping[str, Any], where: str) -> SecurityConfig:
    t = _Table(table, where, SecurityConfig)
    d = SecurityConfig()
    security = SecurityConfig(
        # uid 0 is root and 65534 is nobody; (2^32 - 1) is the kernel's "no uid".
        sandbox_id_base=t.integer("sandbox_id_base", d.sandbox_id_base, 65_536, 0xFFFFFFFE),
        sandbox_id_count=t.integer("sandbox_id_count", d.sandbox_id_count, 1, 1 << 24),
        unprivileged_vmm=t.boolean("unprivileged_vmm", d.unprivileged_vmm),
        jail=t.boolean("jail", d.jail),
        cgroup_limits=t.boolean("cgroup_limits", d.cgroup_limits),
    )
    if security.sandbox_id_base + security.sandbox_id_count > 0xFFFFFFFF:
        raise ConfigError(f"{where}.sandbox_id_count: the range ends past the largest uid (4294967294)")
    if security.jail and not security.unprivileged_vmm:
        # A root QEMU in a chroot is one chroot(2) away from the host's file system.
        raise ConfigError(f"{where}.jail: needs unprivileged_vmm = true (root escapes a chroot)")
    return security
