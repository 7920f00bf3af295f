"""containerd-shim-capsa-v2: containerd's shim v2 API (ttrpc) for one pod, runtime, shim and proxy in one process."""
