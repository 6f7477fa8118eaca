"""Rates and memory the Kasthuri15 projection needs, measured on this machine.

    python benchmarks/scale.py [--edges N]

Look-up tables: the segments step (pipeline/kernels/lut.py) on a synthetic
region graph of N edges (default 1e8) and N / 10 fragments (a RAG has about
ten edges per fragment), in blocks of 1e6 voxels with fragment ids as the
fragments step makes them. Edges join random fragment pairs, which is the
worst case for the union-find's memory access (a real RAG's edges are
local); scores are uniform, thresholds 0.1 .. 0.9. Prints edges/s and the
master's peak memory beyond the fragment arrays, in bytes per edge (numpy
allocations, traced by tracemalloc; the edge chunks are drawn before, as a
store's reader would hand them over, and are not counted).
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.kernels.lut import FragmentIndex, build_luts  # noqa: E402

CHUNK = 10_000_000  # edges per streamed chunk, as a store would hand them over
VOXELS_PER_BLOCK = 1_000_000
THRESHOLDS = [round(0.1 * k, 1) for k in range(1, 10)]


def synthetic_fragments(count: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """`count` fragment ids, 1..n_b in each block, about 1000 per block."""
    blocks = max(1, count // 1000)
    counts = rng.multinomial(count, np.full(blocks, 1 / blocks))
    ids = np.concatenate([b * VOXELS_PER_BLOCK + np.arange(1, n + 1, dtype=np.uint64) for b, n in enumerate(counts)])
    return ids.astype(np.uint64), blocks


def edge_chunks(ids: np.ndarray, edges: int, seed: int):
    rng = np.random.default_rng(seed)
    for start in range(0, edges, CHUNK):
        m = min(CHUNK, edges - start)
        yield ids[rng.integers(0, len(ids), m)], ids[rng.integers(0, len(ids), m)], rng.random(m, dtype=np.float32)


def measure_luts(edges: int) -> dict:
    rng = np.random.default_rng(0)
    ids, blocks = synthetic_fragments(max(2, edges // 10), rng)
    fragments = FragmentIndex.from_ids(ids, VOXELS_PER_BLOCK, blocks)
    # warm the compiled kernels on a tiny graph: compiling is not the rate
    for _ in build_luts(FragmentIndex.from_ids(ids[:10], VOXELS_PER_BLOCK, blocks), edge_chunks(ids[:10], 10, 1), [0.5]):
        pass
    # the chunks are drawn before the clock and the tracing start: drawing
    # random numbers is not the rate, and a store's reader holds one chunk
    chunks = list(edge_chunks(ids, edges, 2))
    tracemalloc.start()
    started = time.perf_counter()
    segments = 0
    for _, table in build_luts(fragments, iter(chunks), THRESHOLDS):
        segments = int(np.count_nonzero(table.segments == ids))
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # the fragment arrays: ids (8 B), union-find (4 B), one table (8 B), the
    # ids in index order (8 B), per fragment
    per_fragment = len(ids) * (8 + 4 + 8 + 8)
    return {
        "edges": edges,
        "fragments": len(ids),
        "seconds": seconds,
        "edges_per_s": edges / seconds,
        "peak_bytes": peak,
        "bytes_per_edge": (peak - per_fragment) / edges,
        "segments_at_0.9": segments,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", type=float, default=1e8, help="synthetic RAG edges (default 1e8)")
    args = parser.parse_args()
    r = measure_luts(int(args.edges))
    print(f"look-up tables: {r['edges']:.3g} edges, {r['fragments']:.3g} fragments, {len(THRESHOLDS)} thresholds")
    print(f"  {r['seconds']:.1f} s, {r['edges_per_s'] / 1e6:.1f} M edges/s (one core)")
    print(f"  master peak {r['peak_bytes'] / 2**30:.2f} GiB; beyond the fragment arrays (28 B per fragment): "
          f"{r['bytes_per_edge']:.1f} B per edge")


if __name__ == "__main__":
    main()
