#!/usr/bin/env bash
# Run one container in a VM and show that it has its own kernel.
set -euo pipefail
work=$(mktemp -d /tmp/capsa-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rootfs/bin"
cp /bin/busybox "$work/rootfs/bin/busybox"
for applet in sh uname cat echo true; do ln -s busybox "$work/rootfs/bin/$applet"; done
cd "$work"
capsa spec
# A non-interactive command instead of the spec's shell on a terminal.
python3 - <<'PY'
import json
spec = json.load(open("config.json"))
spec["process"]["terminal"] = False
spec["process"]["args"] = ["sh", "-c", "echo \"guest kernel: $(uname -r)\""]
json.dump(spec, open("config.json", "w"), indent=2)
PY
echo "host kernel:  $(uname -r)"
capsa run "demo-$$"
