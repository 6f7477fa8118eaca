"""The graph store's "runs" codec (pipeline/storage/graph_records.py): v of
edges sorted by (u, v), as v - u at the first edge of each u and as the
difference from the previous v after it. One pass each way; the numpy form
of the decoding (a cumulative sum restarted at every run) took six passes
and held the whole-graph stream under 20 M edges/s on this VM. Tested
against numpy references (tests/test_graph_store.py)."""

from __future__ import annotations

from numba import njit


@njit(cache=True, nogil=True)
def runs_encode(u, v, out) -> None:
    for i in range(len(u)):
        out[i] = v[i] - (u[i] if i == 0 or u[i] != u[i - 1] else v[i - 1])


@njit(cache=True, nogil=True)
def runs_decode(u, d, out) -> None:
    """`out` may be `d` itself."""
    for i in range(len(u)):
        out[i] = d[i] + (u[i] if i == 0 or u[i] != u[i - 1] else out[i - 1])
