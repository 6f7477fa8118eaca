"""Rates and memory the Kasthuri15 projection needs, measured on this machine,
and the projection itself.

    python benchmarks/scale.py [--edges N] [--graph-edges N] [--mutex-edges N] [--bench-run DIR] [--mutex-run DIR]
        [--only mutex]
        [--gpu-voxels-per-s R] [--gpus G] [--cores C]

Graph store: writes and whole-graph reads of a region graph of
`--graph-edges` edges (default 1e7), for SQLite and for MongoDB
(MONGODB_URI, or a local secantus server, the MongoDB-wire server of the
tests), with 1, 2 and 4 concurrent writer processes. The graph is the real
one of the `make bench` run's blocks (--bench-run), repeated with ids moved
to new blocks: real merge scores, per-offset affinities and id structure,
so the bytes per edge are those of a run; without that run, synthetic
blocks with random attributes. Prints edges/s written (from the moment all
writers are ready until the last one finishes), node ids read, edges
streamed into numpy with their merge score (what the segments step does),
and bytes per edge: of the records, and of the SQLite file.

Look-up tables: the segments step (pipeline/kernels/lut.py) on a synthetic
region graph of N edges (default 1e8) and N / 10 fragments (a RAG has about
ten edges per fragment), in blocks of 1e6 voxels with fragment ids as the
fragments step makes them. Edges join random fragment pairs, which is the
worst case for the union-find's memory access (a real RAG's edges are
local); scores are uniform, thresholds 0.1 .. 0.9. Prints edges/s and the
master's peak memory beyond the fragment arrays, in bytes per edge (numpy
allocations, traced by tracemalloc; the edge chunks are drawn before, as a
store's reader would hand them over, and are not counted).

Graph mutex watershed: the mutex partitioner's master step
(pipeline/kernels/graph_mutex.py) on two synthetic graphs of `--mutex-edges`
edges (default 1e8) and N / 10 fragments: a local one (fragments on a cube
grid, ten reaches each, noisy affinities of Voronoi cells: a region graph's
structure) and random pairs with strengths uniform in -255..255, its worst
case (clusters grow large and carry many mutexes, where a real region
graph's are few and local). Prints edges/s and the peak memory beyond the fragment
arrays and the edge chunks, per edge (the process's peak resident memory:
the kernel's hash table is allocated by compiled code, which tracemalloc
does not see).

Projection: Kasthuri15 (10747 x 12895 x 1850 voxels) on G GPUs and C cores
(default 8 and 256), from the rates above and from a `make bench` run
(--bench-run, default runs/bench_postprocess/waterz: each post-processing
step's voxels per CPU second, the fragments and edges per voxel, the bytes
per voxel of each dataset on disk), with predict at R voxels/s per GPU
(default 17.8e6: the mean of four runs of benchmarks/predict_phases.py with
the worker's 3 lanes on an H100, the bundled model; README). Prints the time of each step, the largest being what limits
the run. The mutex path's rows (`partition: "mutex_3d"`) come from the
same bench's mutex run (--mutex-run, default runs/bench_postprocess/mutex_3d):
its block steps, and the graph mutex watershed over its graph (long-range
edges too: more edges per voxel than waterz's).
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

from pipeline.kernels.graph_mutex import mutex_lut  # noqa: E402
from pipeline.kernels.lut import FragmentIndex, build_luts  # noqa: E402

KASTHURI15 = 10747 * 12895 * 1850  # voxels
KASTHURI15_SHAPE = (1850, 12895, 10747)  # z, y, x at 30 x 6 x 6 nm
# configs/cluster_kasthuri15.json's post-processing block in voxels
KASTHURI15_BLOCK = (48, 384, 384)
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


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since `reset_peak`) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


# the local graph's offsets in fragments: nearest neighbours, then longer
# reaches, ten per fragment as a region graph with long-range pairs has
LOCAL_OFFSETS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 0, 0), (0, 3, 0), (0, 0, 3), (3, 0, 0), (0, 9, 0), (0, 0, 9),
                 (0, 5, 5)]


def random_mutex_edges(ids: np.ndarray, edges: int):
    """Random fragment pairs, strengths uniform in -255..255."""
    draw = np.random.default_rng(2)
    for start in range(0, edges, CHUNK):
        m = min(CHUNK, edges - start)
        yield (ids[draw.integers(0, len(ids), m)], ids[draw.integers(0, len(ids), m)],
               draw.integers(-255, 256, m).astype(np.int16))


def local_mutex_edges(ids: np.ndarray, edges: int):
    """Fragments on a cube grid in index order, each with an edge at every
    LOCAL_OFFSETS reach; the truth is the Voronoi cells of one seed per
    1000 fragments, and each edge's uint8 affinity is 0.9 within a cell,
    0.1 across, plus Gaussian noise of 0.2, minus a bias of 0.5."""
    side = round(len(ids) ** (1 / 3))
    draw = np.random.default_rng(2)
    grid = np.indices((side, side, side)).reshape(3, -1).T
    seeds = draw.integers(0, side, size=(max(1, side**3 // 1000), 3))
    from scipy.spatial import cKDTree

    truth = cKDTree(seeds).query(grid)[1]
    index = np.arange(side**3).reshape(side, side, side)
    made = 0
    for offset in LOCAL_OFFSETS:
        here = tuple(slice(0, side - o) for o in offset)
        there = tuple(slice(o, side) for o in offset)
        a, b = index[here].ravel(), index[there].ravel()
        for start in range(0, len(a), CHUNK):
            u, v = a[start : start + CHUNK], b[start : start + CHUNK]
            affinity = np.where(truth[u] == truth[v], 0.9, 0.1) + draw.normal(0, 0.2, len(u))
            strength = np.round(np.clip(affinity, 0, 1) * 255).astype(np.int16) - 128
            yield ids[u], ids[v], strength
            made += len(u)
            if made >= edges:
                return


def measure_mutex(edges: int, graph: str) -> dict:
    rng = np.random.default_rng(0)
    ids, blocks = synthetic_fragments(max(2, edges // len(LOCAL_OFFSETS)), rng)
    fragments = FragmentIndex.from_ids(ids, VOXELS_PER_BLOCK, blocks)
    tiny = FragmentIndex.from_ids(ids[:10], VOXELS_PER_BLOCK, blocks)
    mutex_lut(tiny, [(ids[:3], ids[1:4], np.array([5, -5, 3], dtype=np.int16))])  # compile first
    # drawn before the clock, as a store's reader would hand them over
    chunks = list((random_mutex_edges if graph == "random" else local_mutex_edges)(ids, edges))
    reset_peak()
    before = resident_bytes("VmRSS")
    started = time.perf_counter()
    table = mutex_lut(fragments, iter(chunks))
    seconds = time.perf_counter() - started
    peak = resident_bytes("VmHWM") - before
    # union-find, list heads (3 x 4 B), the ids in index order, the table
    per_fragment = len(ids) * (4 + 12 + 8 + 8)
    drawn = sum(len(c[0]) for c in chunks)
    return {"graph": graph, "edges": drawn, "fragments": len(ids), "seconds": seconds, "edges_per_s": drawn / seconds,
            "peak_bytes": peak, "bytes_per_edge": (peak - per_fragment) / drawn,
            "segments": len(np.unique(table.segments))}


def template_graph(run: Path) -> tuple[list, str]:
    """[(nodes, edges)] per block of a real graph (a make bench run's), or
    synthetic blocks where there is none, and which it is."""
    from pipeline.orchestration.run_layout import RunDir
    from pipeline.storage.graph_records import Edges, Nodes
    from pipeline.storage.graph_store import open_store

    if (run / "graph.sqlite").exists():
        layout = RunDir(run).read_layout()
        blocks = range(int(np.prod(layout.block_grid)))
        with open_store("sqlite", run, RunDir(run).run_id()) as store:
            template = [(store.read_nodes([b]), store.read_edges([b], ["merge_score", "linked", "affinities"]))
                        for b in blocks]
        shift = [b * layout.voxels_per_block for b in blocks]
        return [(n, e, s) for (n, e), s in zip(template, shift)], f"the {len(template)} blocks of {run}, repeated"
    rng = np.random.default_rng(3)
    per_block, channels = 10_000, 12
    template = []
    for block in range(8):
        first = block * VOXELS_PER_BLOCK
        ids = np.arange(first + 1, first + per_block // 5 + 1, dtype=np.uint64)
        u = np.sort(rng.choice(ids, per_block))
        v = ids[-1] + np.uint64(1) + np.arange(per_block, dtype=np.uint64)  # distinct partners: unique pairs
        linked = rng.random((per_block, channels)) < 0.3
        template.append((Nodes(ids, rng.random((len(ids), 3)), np.ones(len(ids), dtype=np.int64)),
                         Edges(u, v, {"merge_score": rng.random(per_block, dtype=np.float32), "linked": linked,
                                      "affinities": np.where(linked, rng.integers(0, 256, linked.shape), 0).astype(np.uint8)}),
                         first))
    return template, "synthetic blocks (random scores and affinities: a worst case for compression)"


def shifted(template: list, block: int) -> tuple:
    """Block `block` of the benchmark's graph: a template block with its ids
    moved to the block's own range."""
    from pipeline.storage.graph_records import Edges, Nodes

    nodes, edges, first = template[block % len(template)]
    move = np.uint64(block * VOXELS_PER_BLOCK * 10 - first)  # x10: template ids stay apart from any block's
    return (Nodes(nodes.ids + move, nodes.centers, nodes.sizes),
            Edges(edges.u + move, edges.v + move, edges.attributes))


def record_bytes(template: list) -> tuple[float, float]:
    """Bytes per edge of the edge records both backends store (their
    columns), and of the node records."""
    from pipeline.storage.graph_records import encode_edges, encode_nodes

    def stored(records) -> int:
        return sum(len(c) for r in records for c in r.columns.values())

    edges = sum(len(e) for _, e, _ in template)
    return (sum(stored(encode_edges(b, e)) for b, (_, e, _) in enumerate(template)) / edges,
            sum(stored(encode_nodes(b, n)) for b, (n, _, _) in enumerate(template)) / edges)


def write_blocks(spec: str, run_dir: str, template: list, blocks: range, start, done) -> None:
    """One writer process: its blocks' nodes and edges, as the fragments
    and agglomerate workers write them, from the moment all are ready."""
    from pipeline.storage.graph_records import encode_edges
    from pipeline.storage.graph_store import open_store

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    graph = [shifted(template, b) for b in blocks]  # made before the clock
    encode_edges(0, graph[0][1])  # loads the compiled codec, once per worker: not the rate
    with open_store(spec, Path(run_dir), "0" * 32) as store:
        start.wait()
        for block, (nodes, edges) in zip(blocks, graph):
            store.write_nodes(block, nodes)
            store.write_edges(block, edges)
    done.put(sum(len(e) for _, e in graph))


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def measure_store(spec: str, run_dir: Path, edges: int, writers: int, template: list) -> dict:
    """Whole-run rates of `writers` concurrent writer processes, of the
    master's reads, and of the store's own part of a write: records
    encoded before the clock and replaced block after block in one
    process, which is what SQLite's one-writer lock serialises."""
    import multiprocessing

    from pipeline.storage.graph_records import encode_edges, encode_nodes
    from pipeline.storage.graph_store import open_store

    per_block = np.mean([len(e) for _, e, _ in template])
    blocks = max(writers, int(edges / per_block))
    context = multiprocessing.get_context("spawn")  # a fresh store connection in each
    start, done = context.Barrier(writers + 1), context.Queue()
    with open_store(spec, run_dir, "0" * 32) as store:
        store.reset()
    processes = [context.Process(target=write_blocks, args=(spec, str(run_dir), template, range(k, blocks, writers), start, done))
                 for k in range(writers)]
    for process in processes:
        process.start()
    start.wait()
    started = time.perf_counter()
    written = sum(done.get() for _ in processes)
    write_s = time.perf_counter() - started
    for process in processes:
        process.join()
        if process.exitcode:
            raise SystemExit(f"a writer failed (exit {process.exitcode})")
    with open_store(spec, run_dir, "0" * 32) as store:
        # the median of three reads: one takes a fraction of a second
        node_s = np.median([timed(store.node_ids)[0] for _ in range(3)])
        nodes = len(store.node_ids())
        read_s = np.median([timed(lambda: sum(len(c) for c in store.stream_edges(["merge_score"])))[0] for _ in range(3)])
        streamed = sum(len(c) for c in store.stream_edges(["merge_score"]))
        rates = {"edges": written, "blocks": blocks, "write_per_s": written / write_s, "nodes": nodes,
                 "nodes_per_s": nodes / node_s, "read_per_s": written / read_s}
        if spec == "sqlite":
            store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            rates["file_bytes"] = (run_dir / "graph.sqlite").stat().st_size / written
        if writers == 1:
            encoded = [(b, encode_nodes(b, n), encode_edges(b, e)) for b, (n, e) in
                       ((b, shifted(template, b)) for b in range(blocks))]
            started = time.perf_counter()
            for block, node_records, edge_records in encoded:
                store._replace("nodes", block, node_records)
                store._replace("edges", block, edge_records)
            rates["replace_per_s"] = written / (time.perf_counter() - started)
        store.reset()
    assert streamed == written
    return rates


def mongodb_uri(storage: Path):
    """MONGODB_URI, or a secantus server started here (returned to stop)."""
    import os

    if os.environ.get("MONGODB_URI"):
        return os.environ["MONGODB_URI"], None
    from secantus import SecantusDBServer

    server = SecantusDBServer(host="127.0.0.1", port=0, storage_path=str(storage))
    server.start()
    return server.uri, server


def report_mutex(r: dict) -> None:
    kind = ("random pairs, strengths uniform in -255..255" if r["graph"] == "random" else
            "a grid's local pairs, noisy affinities of Voronoi cells")
    print(f"graph mutex watershed: {r['edges']:.3g} edges ({kind}), {r['fragments']:.3g} fragments; "
          f"{r['segments']} segments")
    print(f"  {r['seconds']:.1f} s, {r['edges_per_s'] / 1e6:.2f} M edges/s (one core)")
    print(f"  peak {r['peak_bytes'] / 2**30:.2f} GiB beyond the edge chunks; beyond the fragment arrays "
          f"(32 B per fragment): {r['bytes_per_edge']:.1f} B per edge")


def project(bench_run: Path, mutex_run: Path, stores: dict, edge_bytes: float, node_bytes: float, luts: dict,
            mutex: dict, gpu_rate: float, gpus: int, cores: int) -> None:
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
    for name, runs in stores.items():
        one = dict(runs)[1]
        # a write is the worker's encoding (parallel, on its own core) and
        # the store's part, which one SQLite file takes a block at a time
        encode_s = 1 / one["write_per_s"] - 1 / one["replace_per_s"]
        rows.append(("record encoding (in the workers)", 0, f"{edges * encode_s / 3600:.1f} core h",
                     edges * encode_s / cores / 3600))
        rows.append((f"store writes ({name}, one at a time)", 0, f"{one['replace_per_s'] / 1e6:.1f} M edges/s",
                     edges / one["replace_per_s"] / 3600))
        rows.append((f"store edge stream ({name})", 0, f"{one['read_per_s'] / 1e6:.1f} M edges/s",
                     edges / one["read_per_s"] / 3600))
    memory = (28 * fragments + luts["bytes_per_edge"] * edges) / 2**30
    rows.append(("look-up tables (master)", 0, f"{luts['edges_per_s'] / 1e6:.1f} M edges/s, {memory:.0f} GiB",
                 edges / luts["edges_per_s"] / 3600))
    if (mutex_run / "report.json").exists():
        # the mutex path at its own graph's density; the graph kernel's rate
        # is the random graph's, its worst case
        mutex_report = json.loads((mutex_run / "report.json").read_text())
        m_scale = KASTHURI15 / mutex_report["volume_voxels"]
        for step in ("mutex_fragments", "mutex_graph", "mutex_relabel"):
            core_h = mutex_report["steps"][step]["cpu_s"] * m_scale / 3600
            rows.append((f"mutex_3d: {step}", core_h, f"{core_h:.0f} core h", core_h / cores))
        m_fragments, m_edges = mutex_report["graph"]["fragments"] * m_scale, mutex_report["graph"]["edges"] * m_scale
        memory = (32 * m_fragments + mutex["bytes_per_edge"] * m_edges) / 2**30
        rows.append((f"mutex_3d: graph mutex watershed ({m_edges:.2g} edges)", 0,
                     f"{mutex['edges_per_s'] / 1e6:.1f} M edges/s, {memory:.0f} GiB", m_edges / mutex["edges_per_s"] / 3600))
    else:
        print(f"(no mutex_3d rows: {mutex_run} holds no make bench run)")
    print(f"{'step':<52}{'rate or work':>28}{'hours':>9}")
    for name, _, work, hours in rows:
        print(f"{name:<52}{work:>28}{hours:>9.2f}")
    # the two partitioners are alternatives: each path's own steps, and what they share
    waterz_steps = ("fragments", "agglomerate", "relabel", "look-up tables (master)")
    for path, mine in (("waterz", lambda name: not name.startswith("mutex_3d:")),
                       ("mutex_3d", lambda name: name not in waterz_steps)):
        if path == "mutex_3d" and not any(name.startswith("mutex_3d:") for name, *_ in rows):
            continue
        limit = max((r for r in rows if mine(r[0])), key=lambda r: r[3])
        print(f"limiting ({path} path): {limit[0]}, {limit[3]:.2f} h ({limit[3]:.1f}x the one-hour goal)")
    mongodb_load(report, edges, edge_bytes, cores)
    print("storage:")
    for dataset in ("affs", "fragments", "segmentation"):
        size = sum(f.stat().st_size for f in (bench_run / "volumes.zarr" / dataset).rglob("*") if f.is_file())
        print(f"  {dataset:<14}{size / voxels:6.2f} B/voxel on disk -> {size * scale / 1e12:6.2f} TB")


def mongodb_load(report: dict, edges: float, edge_bytes: float, cores: int) -> None:
    """What a real MongoDB server must sustain at Kasthuri15 scale: every
    agglomerate worker writes its block's edges as it finishes it, so the
    server takes the records of `cores` workers at the agglomerate step's
    rate. Beside it, published `mongod` insert rates."""
    from pipeline.storage.graph_records import PART_BYTES

    blocks = int(np.prod(np.ceil(np.array(KASTHURI15_SHAPE) / KASTHURI15_BLOCK)))
    block_bytes = edges * edge_bytes / blocks
    documents = blocks * int(np.ceil(block_bytes / PART_BYTES))  # a block's edges, in parts
    step_s = report["steps"]["agglomerate"]["cpu_s"] * KASTHURI15 / report["volume_voxels"] / cores
    print(f"MongoDB at {cores} writers: the edges of the agglomerate step's {blocks} blocks ({edges / blocks / 1e6:.2f} M edges, "
          f"{block_bytes / 1e6:.1f} MB each) in {step_s / 60:.0f} min: {documents / step_s:.0f} documents/s, "
          f"{edges * edge_bytes / step_s / 1e6:.0f} MB/s; a document per edge (the old layout) would be "
          f"{edges / step_s / 1e6:.1f} M documents/s. Published mongod insert rates: about 1e5 documents/s "
          f"(Percona, iiBench on WiredTiger 3.2, 200 M documents in 31 min, one NVMe SSD)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", type=float, default=1e8, help="synthetic RAG edges (default 1e8)")
    parser.add_argument("--graph-edges", type=float, default=1e7, help="edges written to and read from each store (default 1e7)")
    parser.add_argument("--bench-run", default=str(Path(__file__).resolve().parent.parent / "runs/bench_postprocess/waterz"),
                        help="make bench's waterz run directory, for the projection (skipped if absent)")
    parser.add_argument("--mutex-run", default=str(Path(__file__).resolve().parent.parent / "runs/bench_postprocess/mutex_3d"),
                        help="make bench's mutex_3d run directory, for the projection's mutex rows")
    parser.add_argument("--gpu-voxels-per-s", type=float, default=17.8e6, help="predict rate per GPU (default: the H100's)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--cores", type=int, default=256)
    parser.add_argument("--mutex-edges", type=float, default=1e8, help="synthetic edges of the graph mutex watershed (default 1e8)")
    parser.add_argument("--only", choices=["mutex"], help="only the graph mutex watershed (no stores, tables or projection)")
    args = parser.parse_args()
    if args.only == "mutex":
        for graph in ("local", "random"):
            report_mutex(measure_mutex(int(args.mutex_edges), graph))
        return
    stores = {}
    template, source = template_graph(Path(args.bench_run))
    edge_bytes, node_bytes = record_bytes(template)
    print(f"graph store: {args.graph_edges:.3g} edges from {source}")
    print(f"records: edges {edge_bytes:.2f} bytes per edge ({template[0][1]['linked'].shape[1]} offsets), "
          f"nodes {node_bytes:.2f} per edge")
    print("edges/s: written by 1, 2 and 4 concurrent writer processes (whole runs, nodes and edges); node ids read; "
          "edges streamed into numpy with their merge score (the segments step); the store's part of a write "
          "(records encoded before: what SQLite's lock serialises)")
    print(f"{'store':<10}{'writers':>8}{'written':>12}{'node ids':>12}{'streamed':>12}{'store part':>12}"
          f"{'file B/edge':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        uri, server = mongodb_uri(Path(tmp) / "mongodb")
        try:
            for name, spec in (("SQLite", "sqlite"), ("MongoDB", uri.rstrip("/") + "/affseg_scale_benchmark")):
                for writers in (1, 2, 4):
                    g = measure_store(spec, Path(tmp) / f"run-{name}-{writers}", int(args.graph_edges), writers, template)
                    # secantus is the tests' pure-Python server: its rates are
                    # not a deployment's, so they stay out of the projection
                    if name == "SQLite" or server is None:
                        stores.setdefault(name, []).append((writers, g))
                    part = f"{g['replace_per_s'] / 1e6:.2f} M" if "replace_per_s" in g else "-"
                    file_bytes = f"{g['file_bytes']:.2f}" if "file_bytes" in g else "-"
                    print(f"{name:<10}{writers:>8}{g['write_per_s'] / 1e6:>10.2f} M{g['nodes_per_s'] / 1e6:>10.2f} M"
                          f"{g['read_per_s'] / 1e6:>10.2f} M{part:>12}{file_bytes:>12}")
        finally:
            if server is not None:
                server.stop()
    r = measure_luts(int(args.edges))
    print(f"look-up tables: {r['edges']:.3g} edges, {r['fragments']:.3g} fragments, {len(THRESHOLDS)} thresholds")
    print(f"  {r['seconds']:.1f} s, {r['edges_per_s'] / 1e6:.1f} M edges/s (one core)")
    print(f"  master peak {r['peak_bytes'] / 2**30:.2f} GiB; beyond the fragment arrays (28 B per fragment): "
          f"{r['bytes_per_edge']:.1f} B per edge")
    report_mutex(measure_mutex(int(args.mutex_edges), "local"))
    mutex = measure_mutex(int(args.mutex_edges), "random")
    report_mutex(mutex)
    if (Path(args.bench_run) / "report.json").exists():
        project(Path(args.bench_run), Path(args.mutex_run), stores, edge_bytes, node_bytes, r, mutex,
                args.gpu_voxels_per_s, args.gpus, args.cores)
    else:
        print(f"no projection: {args.bench_run} holds no make bench run")


if __name__ == "__main__":
    main()
