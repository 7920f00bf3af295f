"""containerd's shim v2, event and cgroup metrics messages, wire-compatible with containerd 1.6.

The directories mirror the protobuf packages' import paths, so the generated modules import each
other as ``capsa.protocols.containerd...``; protobuf package names (``containerd.task.v2`` ...) are
containerd's own, since ttrpc requests and ``Any`` type URLs carry them.
"""
