"""capsa-monitor: Prometheus metrics for every capsa sandbox on a host.

One process per host (kata-monitor's place) serves ``/metrics`` over HTTP.
Each scrape, at most once per cache interval, it

- reads the process table once (:mod:`.procfs`),
- finds the sandboxes (:mod:`.discovery`): the runc-CLI containers under the
  state roots and the socket directories' links back to them, and the pods of
  ``containerd-shim-capsa-v2`` from the shims' own processes,
- sorts each sandbox's host processes into roles (:mod:`.roles`) and reads
  their CPU time and memory,
- asks each live sandbox's agent for the guest's figures, a bounded number at
  once and each within a deadline (:mod:`.guest`),

and turns that snapshot into metric families with pure functions
(:mod:`.metrics`).  :mod:`.collector` holds the cache, :mod:`.main` the HTTP
server and the command line.
"""
