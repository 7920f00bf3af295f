#!/usr/bin/env bash
# Install capsa on a Debian 12 machine, as root: Debian packages, a Python
# virtual environment with capsa in it, the guest kernel and the guest image
# (both cached under /var/cache/capsa and rebuilt only when their inputs
# change). Then, unless --no-demo, run a container in a VM.
#
#   scripts/setup.sh            install everything, then run the demo
#   scripts/setup.sh --no-demo  install everything (what the test run uses)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${CAPSA_VENV:-/opt/capsa/venv}
demo=1
[ "${1:-}" = "--no-demo" ] && demo=0

say() { printf '==> %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs packages and builds in /var/cache/capsa)" >&2
    exit 1
fi

# Host side: QEMU (with Debian's virtiofsd), the kernel source and what
# builds it, busybox for test images. The guest's own packages (python3.11,
# crun) are downloaded by the image builder, not installed here.
packages=(
    qemu-system-x86 qemu-system-common
    python3 python3-venv
    linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev cpio kmod xz-utils
    busybox-static erofs-utils e2fsprogs zstd lz4 iproute2 procps psmisc
    podman conmon docker.io containerd runc  # the engines tests/e2e drives (Podman 4.3, Docker 20.10, containerd 1.6)
    containernetworking-plugins iptables  # CNI: the CRI pods of tests/e2e/test_cri.py, and Podman 4.3's network backend (no netavark: bridge, portmap, firewall, tuning) in test_network_engines.py
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The image builder downloads the guest's packages with apt-get download,
# which needs the package lists even when nothing is missing on the host.
if [ ${#missing[@]} -gt 0 ] || ! compgen -G '/var/lib/apt/lists/*_Packages*' > /dev/null; then
    apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$venv/bin/python" ]; then
    say "creating the Python environment $venv"
    /usr/bin/python3 -m venv "$venv"
fi
stamp="$venv/.capsa-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ] || \
   [ "$(cat "$stamp")" != "$repo" ]; then
    say "installing capsa and its Python dependencies into $venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -e "$repo[dev]"
    echo "$repo" > "$stamp"
fi
# The jailed QEMU's parent outside its PID namespace (hypervisor/jail.py):
# a small C program, under /usr so that the jail, which holds /usr, has it.
vmm_src="$repo/src/capsa/hypervisor/vmm/capsa-vmm.c"
vmm=/usr/local/libexec/capsa/capsa-vmm
if [ ! -x "$vmm" ] || ! cmp -s "$vmm_src" "$vmm.c"; then
    say "building $vmm"
    install -d -m 0755 "$(dirname "$vmm")"
    cc -O2 -Wall -Wextra -Werror -o "$vmm.new" "$vmm_src"
    install -m 0755 "$vmm.new" "$vmm"
    install -m 0644 "$vmm_src" "$vmm.c"
    rm -f "$vmm.new"
fi
for tool in capsa capsa-agent capsa-monitor capsa-proxy capsa-shim containerd-shim-capsa-v2; do
    ln -sf "$venv/bin/$tool" "/usr/local/bin/$tool"
done

say "guest kernel"
"$venv/bin/python" "$repo/guest/kernel/build.py"
say "guest image"
"$venv/bin/python" "$repo/guest/image/build.py"

if [ ! -e /etc/capsa/configuration.toml ]; then
    install -D -m 0644 "$repo/config/configuration.toml" /etc/capsa/configuration.toml
fi

if [ "$demo" = 1 ]; then
    say "demo: a busybox container in its own VM"
    exec "$repo/scripts/demo.sh"
fi
