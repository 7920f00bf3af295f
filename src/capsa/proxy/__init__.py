"""capsa-proxy: one process per VM, the only owner of its agent channel."""
