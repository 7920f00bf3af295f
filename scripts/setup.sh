#!/usr/bin/env bash
# Install capsa on a Debian 12 machine, as root: Debian packages, a Python
# virtual environment with capsa in it, the guest kernel and the guest image
# (both cached under /var/cache/capsa and rebuilt only when their inputs
# change). Then, unless --no-demo, run a container in a VM.
#
#   scripts/setup.sh            install everything, then run the demo
#   scripts/setup.sh --no-demo  install everything (what the test run uses)
#
# Each step is announced with its number ("==> [4/6] guest kernel"), the
# guest builders show their own progress, and a summary of the time each
# step took ends the run. Sourcing the script defines its functions and runs
# nothing (tests/unit/test_setup_script.py).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${CAPSA_VENV:-/opt/capsa/venv}

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }

# Microseconds since the epoch; bash's EPOCHREALTIME has six decimals, with
# the locale's separator.
now_us() {
    local now=$EPOCHREALTIME
    echo "${now/[.,]/}"
}

# A duration in microseconds as the guest builders' summaries write one
# (guest/buildcache.py format_duration): 0.4s, 52.3s, 6m 05s, 1h 02m.
duration() {
    local tenths=$(( ($1 + 50000) / 100000 )) seconds=$(( ($1 + 500000) / 1000000 ))
    if (( tenths < 600 )); then
        printf '%d.%ds' $(( tenths / 10 )) $(( tenths % 10 ))
    elif (( seconds < 3600 )); then
        printf '%dm %02ds' $(( seconds / 60 )) $(( seconds % 60 ))
    else
        printf '%dh %02dm' $(( seconds / 3600 )) $(( seconds % 3600 / 60 ))
    fi
}

# The closing summary: the run's total time (microseconds, $1), then each
# step done (done_names) with its time (done_us).
summary() {
    local i width=0
    for i in "${!done_names[@]}"; do
        if (( ${#done_names[i]} > width )); then width=${#done_names[i]}; fi
    done
    say "setup done in $(duration "$1")"
    for i in "${!done_names[@]}"; do
        printf '    %-*s  %8s\n' "$width" "${done_names[i]}" "$(duration "${done_us[i]}")"
    done
}

# Host side: QEMU (with Debian's virtiofsd), the kernel source and what
# builds it, busybox for test images. The guest's own packages (python3.11,
# crun) are downloaded by the image builder, not installed here.
packages=(
    qemu-system-x86 qemu-system-common
    python3 python3-venv
    linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev cpio kmod xz-utils
    busybox-static erofs-utils e2fsprogs zstd lz4 iproute2 procps psmisc
    podman conmon docker.io containerd runc  # the engines tests/e2e drives (Podman 4.3, Docker 20.10, containerd 1.6)
    containernetworking-plugins iptables  # CNI: the CRI pods of tests/e2e/test_cri.py, and Podman 4.3's network backend (no netavark: bridge, portmap, firewall, tuning) in test_network_engines.py; iptables also for capsa's loopback relay (CRI PortForward, docs/kubernetes.md)
    prometheus  # Prometheus 2.42, which tests/integration/test_prometheus_vm.py starts on loopback to scrape capsa-monitor
)

# Packages whose service Debian starts, and enables at boot, when it installs
# them, and which a capsa host does not want running: Debian's Prometheus
# listens on every address (:9090); the test starts its own.
quiet_services=(prometheus)

# A policy-rc.d (invoke-rc.d and deb-systemd-invoke ask it before starting
# a service) that refuses the services named ($@) and allows the rest.
quiet_policy() {
    local s
    printf '#!/bin/sh\n# capsa setup.sh, for one apt-get install: these services stay stopped.\n'
    printf 'for arg; do\n    case "$arg" in\n'
    for s in "$@"; do printf '        %s|%s.service) exit 101 ;;\n' "$s" "$s"; done
    printf '    esac\ndone\nexit 0\n'
}

# apt-get install the packages named ($@); those of quiet_services come
# stopped and disabled at boot. A host with its own policy-rc.d keeps it
# (whatever it let start is stopped afterwards); a package already
# installed is not touched, so an admin's own Prometheus stays as it was.
apt_install() {
    local p s quiet=() status=0 policy=/usr/sbin/policy-rc.d ours=0
    for p in "$@"; do
        for s in "${quiet_services[@]}"; do
            if [ "$p" = "$s" ]; then quiet+=("$s"); fi
        done
    done
    if [ ${#quiet[@]} -gt 0 ] && [ ! -e "$policy" ]; then
        quiet_policy "${quiet[@]}" > "$policy"
        chmod 0755 "$policy"
        ours=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" || status=$?
    if [ "$ours" = 1 ]; then rm -f "$policy"; fi
    if [ "$status" != 0 ]; then return "$status"; fi
    for s in "${quiet[@]}"; do
        update-rc.d "$s" disable > /dev/null  # its SysV links and its systemd unit
        if [ "$ours" = 0 ]; then service "$s" stop > /dev/null 2>&1 || true; fi
    done
}

install_packages() {
    local p missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    # The image builder downloads the guest's packages with apt-get download,
    # which needs the package lists even when nothing is missing on the host.
    if [ ${#missing[@]} -gt 0 ] || ! compgen -G '/var/lib/apt/lists/*_Packages*' > /dev/null; then
        apt-get update -q
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        note "installing ${missing[*]}"
        apt_install "${missing[@]}"
    fi
}

install_python() {
    if [ ! -x "$venv/bin/python" ]; then
        note "creating $venv"
        /usr/bin/python3 -m venv "$venv"
    fi
    local stamp="$venv/.capsa-installed" tool
    if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ] || \
       [ "$(cat "$stamp")" != "$repo" ]; then
        note "installing capsa and its Python dependencies into $venv"
        "$venv/bin/pip" install -q --upgrade pip
        "$venv/bin/pip" install -q -e "$repo[dev]"
        echo "$repo" > "$stamp"
    fi
    for tool in capsa capsa-agent capsa-monitor capsa-proxy capsa-shim containerd-shim-capsa-v2; do
        ln -sf "$venv/bin/$tool" "/usr/local/bin/$tool"
    done
}

# The jailed QEMU's parent outside its PID namespace (hypervisor/jail.py):
# a small C program, under /usr so that the jail, which holds /usr, has it.
build_vmm() {
    local vmm_src="$repo/src/capsa/hypervisor/vmm/capsa-vmm.c" vmm=/usr/local/libexec/capsa/capsa-vmm
    if [ ! -x "$vmm" ] || ! cmp -s "$vmm_src" "$vmm.c"; then
        note "building $vmm"
        install -d -m 0755 "$(dirname "$vmm")"
        cc -O2 -Wall -Wextra -Werror -o "$vmm.new" "$vmm_src"
        install -m 0755 "$vmm.new" "$vmm"
        install -m 0644 "$vmm_src" "$vmm.c"
        rm -f "$vmm.new"
    fi
}

build_kernel() { "$venv/bin/python" "$repo/guest/kernel/build.py"; }
# The erofs root image (the default) and the initrd (for image = "").
build_image() {
    "$venv/bin/python" "$repo/guest/image/build.py" --format erofs
    "$venv/bin/python" "$repo/guest/image/build.py"
}

install_config() {
    if [ ! -e /etc/capsa/configuration.toml ]; then
        install -D -m 0644 "$repo/config/configuration.toml" /etc/capsa/configuration.toml
    fi
    # Until issue 15 the shipped configuration named the PVH vmlinux, which
    # boots without KASLR; the bzImage beside it is the same kernel with it.
    local old_kernel='kernel = "/var/lib/capsa/guest/vmlinux"'
    if grep -qxF "$old_kernel" /etc/capsa/configuration.toml; then
        note "the guest kernel is now the bzImage (KASLR), was the vmlinux"
        sed -i "s|^$old_kernel\$|kernel = \"/var/lib/capsa/guest/bzImage\"|" /etc/capsa/configuration.toml
    fi
    # Until issue 14 the shipped configuration booted the initrd (`image = ""`
    # under this comment); the erofs image on virtio-pmem is the default now.
    local old_image_comment='# A root filesystem image instead of the initrd ("" for none); wins if set.'
    if grep -qxF "$old_image_comment" /etc/capsa/configuration.toml; then
        note "the guest root is now the erofs image on virtio-pmem, was the initrd"
        sed -i -e "/^# A root filesystem image instead of the initrd/d" \
            -e 's|^image = ""$|image = "/var/lib/capsa/guest/rootfs.img"|' /etc/capsa/configuration.toml
    fi
    # The example agent policies (docs/agent-policy.md), kept current: they are ours, not the admin's.
    install -d -m 0755 /etc/capsa/policies
    install -m 0644 "$repo"/config/policies/*.toml /etc/capsa/policies/
}

run_demo() { "$repo/scripts/demo.sh"; }

# Names which step failed, and after how long, when one does (set -e ends
# the run there).
report_failure() {
    local status=$1
    if [ "$status" != 0 ] && [ -n "${current:-}" ]; then
        echo "setup.sh: $current failed after $(duration $(( $(now_us) - current_start ))) (exit $status)" >&2
    fi
}

main() {
    local demo=1 started i
    if [ "${1:-}" = "--no-demo" ]; then demo=0; fi
    if [ "$(id -u)" != 0 ]; then
        echo "setup.sh: run as root (it installs packages and builds in /var/cache/capsa)" >&2
        exit 1
    fi
    local names=("Debian packages" "Python environment" "capsa-vmm" "guest kernel" "guest image" "configuration")
    local steps=(install_packages install_python build_vmm build_kernel build_image install_config)
    if [ "$demo" = 1 ]; then
        names+=("demo container")
        steps+=(run_demo)
    fi
    done_names=() done_us=()
    started=$(now_us)
    trap 'report_failure $?' EXIT
    for i in "${!steps[@]}"; do
        current="[$(( i + 1 ))/${#steps[@]}] ${names[i]}"
        current_start=$(now_us)
        say "$current"
        "${steps[i]}"
        done_names+=("${names[i]}")
        done_us+=($(( $(now_us) - current_start )))
    done
    current=""
    summary $(( $(now_us) - started ))
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
