"""Rates and memory the Kasthuri15 projection needs, measured on this machine,
and the projection itself.

    python benchmarks/scale.py [--edges N] [--graph-edges N] [--bench-run DIR]
        [--gpu-voxels-per-s R] [--gpus G] [--cores C]

Graph store: writes and whole-graph reads of a synthetic region graph
(`--graph-edges`, default 5e5 edges, 1e4 per block as the agglomerate
workers write them), for SQLite and for MongoDB (MONGODB_URI, or a local
secantus server, the MongoDB-wire server of the tests). Prints edges/s for
writing (one writer), for reading the node ids and for streaming the edges
(what the segments step does).

Look-up tables: the segments step (pipeline/kernels/lut.py) on a synthetic
region graph of N edges (default 1e8) and N / 10 fragments (a RAG has about
ten edges per fragment), in blocks of 1e6 voxels with fragment ids as the
fragments step makes them. Edges join random fragment pairs, which is the
worst case for the union-find's memory access (a real RAG's edges are
local); scores are uniform, thresholds 0.1 .. 0.9. Prints edges/s and the
master's peak memory beyond the fragment arrays, in bytes per edge (numpy
allocations, traced by tracemalloc; the edge chunks are drawn before, as a
store's reader would hand them over, and are not counted).

Projection: Kasthuri15 (10747 x 12895 x 1850 voxels) on G GPUs and C cores
(default 8 and 256), from the rates above and from a `make bench` run
(--bench-run, default runs/bench_postprocess/run: each post-processing
step's voxels per CPU second, the fragments and edges per voxel, the bytes
per voxel of each dataset on disk), with predict at R voxels/s per GPU
(default 17.8e6: the mean of four runs of benchmarks/predict_phases.py with
the worker's 3 lanes on an H100, the bundled model; README). Prints the time of each step, the largest being what limits
the run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.kernels.lut import FragmentIndex, build_luts  # noqa: E402

KASTHURI15 = 10747 * 12895 * 1850  # voxels
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


def measure_store(spec: str, run_dir: Path, edges: int) -> dict:
    from pipeline.storage.graph_store import Edges, Nodes, open_store

    per_block = 10_000
    rng = np.random.default_rng(3)
    blocks = max(1, edges // per_block)
    written = 0
    with open_store(spec, run_dir, "0" * 32) as store:
        store.reset()
        started = time.perf_counter()
        for block in range(blocks):
            first = block * VOXELS_PER_BLOCK
            ids = np.arange(first + 1, first + per_block // 5 + 1, dtype=np.uint64)
            store.write_nodes(block, Nodes(ids, rng.random((len(ids), 3)), np.ones(len(ids), dtype=np.int64)))
            u = np.sort(rng.choice(ids, per_block))
            # distinct partners above u, inside the block's id range: unique pairs
            v = ids[-1] + np.uint64(1) + np.arange(per_block, dtype=np.uint64)
            store.write_edges(block, Edges(u, v, rng.random(per_block, dtype=np.float32),
                                           rng.random((per_block, 3), dtype=np.float32)))
            written += per_block
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        nodes = len(store.node_ids())
        node_s = time.perf_counter() - started
        started = time.perf_counter()
        streamed = sum(len(chunk[0]) for chunk in store.stream_edges())
        read_s = time.perf_counter() - started
        store.reset()
    assert streamed == written
    return {"edges": written, "write_per_s": written / write_s, "nodes": nodes, "nodes_per_s": nodes / node_s,
            "read_per_s": written / read_s}


def mongodb_uri(storage: Path):
    """MONGODB_URI, or a secantus server started here (returned to stop)."""
    import os

    if os.environ.get("MONGODB_URI"):
        return os.environ["MONGODB_URI"], None
    from secantus import SecantusDBServer

    server = SecantusDBServer(host="127.0.0.1", port=0, storage_path=str(storage))
    server.start()
    return server.uri, server


def project(bench_run: Path, stores: dict, luts: dict, gpu_rate: float, gpus: int, cores: int) -> None:
    """Kasthuri15's steps, each on its own: hours, and the resources."""
    import json

    report = json.loads((bench_run / "report.json").read_text())
    voxels = report["volume_voxels"]
    scale = KASTHURI15 / voxels
    fragments, edges = report["graph"]["fragments"] * scale, report["graph"]["edges"] * scale
    print(f"\nKasthuri15: {KASTHURI15:.3g} voxels, {gpus} GPUs, {cores} cores; from {bench_run}: "
          f"{fragments:.2g} fragments and {edges:.2g} edges at the sample's density")
    rows = [("predict", KASTHURI15 / gpu_rate / 3600, f"{KASTHURI15 / gpu_rate / 3600:.1f} GPU h",
             KASTHURI15 / gpu_rate / gpus / 3600)]
    for step in ("fragments", "agglomerate", "relabel"):
        core_h = report["steps"][step]["cpu_s"] * scale / 3600
        rows.append((step, core_h, f"{core_h:.0f} core h", core_h / cores))
    for name, rates in stores.items():
        rows.append((f"store write ({name}, one writer)", 0, f"{rates['write_per_s'] / 1e3:.0f} k edges/s",
                     edges / rates["write_per_s"] / 3600))
        rows.append((f"store edge stream ({name})", 0, f"{rates['read_per_s'] / 1e3:.0f} k edges/s",
                     edges / rates["read_per_s"] / 3600))
    memory = (28 * fragments + luts["bytes_per_edge"] * edges) / 2**30
    rows.append(("look-up tables (master)", 0, f"{luts['edges_per_s'] / 1e6:.1f} M edges/s, {memory:.0f} GiB",
                 edges / luts["edges_per_s"] / 3600))
    print(f"{'step':<36}{'rate or work':>28}{'hours':>9}")
    for name, _, work, hours in rows:
        print(f"{name:<36}{work:>28}{hours:>9.2f}")
    limit = max(rows, key=lambda r: r[3])
    print(f"limiting: {limit[0]}, {limit[3]:.2f} h ({limit[3]:.1f}x the one-hour goal)")
    if "MongoDB" not in stores:
        print("MongoDB: not projected (no MONGODB_URI: only the tests' secantus server was measured)")
    print("storage:")
    for dataset in ("affs", "fragments", "segmentation"):
        size = sum(f.stat().st_size for f in (bench_run / "volumes.zarr" / dataset).rglob("*") if f.is_file())
        print(f"  {dataset:<14}{size / voxels:6.2f} B/voxel on disk -> {size * scale / 1e12:6.2f} TB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", type=float, default=1e8, help="synthetic RAG edges (default 1e8)")
    parser.add_argument("--graph-edges", type=float, default=5e5, help="edges written to and read from each store")
    parser.add_argument("--bench-run", default=str(Path(__file__).resolve().parent.parent / "runs/bench_postprocess/run"),
                        help="a make bench run directory, for the projection (skipped if absent)")
    parser.add_argument("--gpu-voxels-per-s", type=float, default=17.8e6, help="predict rate per GPU (default: the H100's)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--cores", type=int, default=256)
    args = parser.parse_args()
    stores = {}
    with tempfile.TemporaryDirectory() as tmp:
        uri, server = mongodb_uri(Path(tmp) / "mongodb")
        try:
            for name, spec in (("SQLite", "sqlite"), ("MongoDB", uri.rstrip("/") + "/affseg_scale_benchmark")):
                g = measure_store(spec, Path(tmp) / "run", int(args.graph_edges))
                # secantus is the tests' pure-Python server: its rates are
                # not a deployment's, so they stay out of the projection
                if name == "SQLite" or server is None:
                    stores[name] = g
                print(f"graph store {name}: {g['edges']:.3g} edges written at {g['write_per_s'] / 1e3:.0f} k/s (one writer); "
                      f"{g['nodes']:.3g} node ids read at {g['nodes_per_s'] / 1e3:.0f} k/s; "
                      f"edges streamed at {g['read_per_s'] / 1e3:.0f} k/s")
        finally:
            if server is not None:
                server.stop()
    r = measure_luts(int(args.edges))
    print(f"look-up tables: {r['edges']:.3g} edges, {r['fragments']:.3g} fragments, {len(THRESHOLDS)} thresholds")
    print(f"  {r['seconds']:.1f} s, {r['edges_per_s'] / 1e6:.1f} M edges/s (one core)")
    print(f"  master peak {r['peak_bytes'] / 2**30:.2f} GiB; beyond the fragment arrays (28 B per fragment): "
          f"{r['bytes_per_edge']:.1f} B per edge")
    if (Path(args.bench_run) / "report.json").exists():
        project(Path(args.bench_run), stores, r, args.gpu_voxels_per_s, args.gpus, args.cores)
    else:
        print(f"no projection: {args.bench_run} holds no make bench run")


if __name__ == "__main__":
    main()
