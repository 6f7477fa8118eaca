"""The proofreading list of a run whose model gives an uncertainty (the
latent-mask method's MaskAggr variance, issue 21): where the model itself
doubts, for a proofreader to start there.

Block by block (workers/proofread.py), each voxel pair of the run's
nearest-neighbour offsets whose voxels lie in two different segments
brings the uncertainty of its pair (the variance of that offset's channel
at its first voxel) to the edge of the two segments; a segment's
uncertainty is that of its edges together (issue 21: segments from the
edges of their boundary). A segment's border with the background (label
0) counts for neither: there the foreground decided, not the masks, and on
the nuclei such borders, where the masks agree, hid the doubt between
segments (the ROC AUC of the segments' uncertainty for wrong segments was
0.38 with them, 0.83 without, on the nuclei; docs/latent_masks.md). A
counts the pairs whose first voxel it holds, so each pair counts once, and
the segments' sizes and centres over its own voxels; its sums go to
RUN_DIR/proofreading/BLOCK.npz, which the master adds up (as evaluation
does) into two tables sorted by uncertainty, most doubtful first:

- `proofreading/segments.csv`: segment, voxels, centre z y x (world
  units), contact pairs (with other segments), uncertainty (their mean; 0
  for a segment that touches no other);
- `proofreading/edges.csv`: the two segments, the contact's centre z y x
  (the mean of its pairs' first voxels), pairs, uncertainty (their mean);

and the report's "proofreading" entry holds the top of both. Redone whole
on every run of the job, as evaluation is.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np

from pipeline.kernels.rag import nearest_channels, offset_pairs
from pipeline.orchestration.daisy_run import run_daisy
from pipeline.orchestration.progress import ProgressLog
from pipeline.orchestration.run_layout import RunDir, RunLayout
from pipeline.orchestration.tasks import proofread_task
from pipeline.storage.files import write_atomically

# rows of each table the report shows
TOP = 10
SEGMENT_COLUMNS = ("segment", "voxels", "z", "y", "x", "contact_pairs", "uncertainty")
EDGE_COLUMNS = ("segment_a", "segment_b", "z", "y", "x", "pairs", "uncertainty")


def block_statistics(segmentation: np.ndarray, uncertainty: np.ndarray, offsets, window: tuple[slice, ...],
                     origin, voxel_size) -> dict[str, np.ndarray]:
    """One block's sums: `segmentation` (Z, Y, X) and `uncertainty` (C, Z,
    Y, X) over the block and a context of a voxel, `window` the block's
    slices in them, `origin` the world position of their first voxel.
    Keys: segment_* (ids, voxels and world position sums over the block's
    own voxels), edge_* (keys a < b, pairs, uncertainty sums, world
    position sums of the first voxels)."""
    origin, voxel_size = np.asarray(origin, dtype=np.float64), np.asarray(voxel_size, dtype=np.float64)
    start = np.array([w.start for w in window])
    inner = segmentation[window]
    ids, inverse, voxels = np.unique(inner.ravel(), return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    grid = np.indices(inner.shape).reshape(3, -1)
    positions = np.stack([np.bincount(inverse, weights=(grid[k] + start[k]) * voxel_size[k] + origin[k],
                                      minlength=len(ids)) for k in range(3)], axis=1)
    owned = np.zeros(segmentation.shape, dtype=bool)
    owned[window] = True
    a, b, u, where = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)], [np.zeros(0)], [np.zeros((0, 3))]
    for c in nearest_channels(offsets):
        here, there = offset_pairs(segmentation.shape, offsets[c])
        crossing = (segmentation[here] != segmentation[there]) & owned[here]
        a.append(segmentation[here][crossing])
        b.append(segmentation[there][crossing])
        u.append(uncertainty[c][here][crossing].astype(np.float64))
        first = np.stack(np.nonzero(crossing), axis=1) + [h.start for h in here]
        where.append(first * voxel_size + origin)
    a, b, u, where = (np.concatenate(x) for x in (a, b, u, where))
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    between = lo > 0
    edge_keys, edge_pairs, edge_sums, edge_positions = _add_up(np.stack([lo[between], hi[between]], axis=1),
                                                               u[between], where[between])
    keep = ids > 0
    return {"segment_ids": ids[keep], "segment_voxels": voxels[keep], "segment_positions": positions[keep],
            "edge_keys": edge_keys, "edge_pairs": edge_pairs, "edge_sums": edge_sums, "edge_positions": edge_positions}


def _add_up(ids: np.ndarray, *columns: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Rows with the same id (ids (N,), or keys (N, 2)) together: (the
    unique ids in order, the rows' counts (or the sums of `counts`), each
    column summed), uint64 ids, float64 sums."""
    unique, at = np.unique(ids.astype(np.uint64), axis=0, return_inverse=True)
    at = at.ravel()
    weights = np.ones(len(at)) if counts is None else counts.astype(np.float64)
    summed = [np.bincount(at, weights=weights, minlength=len(unique)).astype(np.int64)]
    for column in columns:
        flat = column.reshape(len(column), int(np.prod(column.shape[1:]))).astype(np.float64)
        summed.append(np.stack([np.bincount(at, weights=flat[:, k], minlength=len(unique))
                                for k in range(flat.shape[1])], axis=1).reshape((len(unique), *column.shape[1:])))
    return (unique, *summed)


def merge(blocks: list[dict[str, np.ndarray]]) -> tuple[list[tuple], list[tuple]]:
    """The two tables (rows in SEGMENT_COLUMNS and EDGE_COLUMNS order) of
    the blocks' sums, most uncertain first (then by segment ids)."""
    def stacked(key: str, shape: tuple = ()) -> np.ndarray:
        dtype = np.uint64 if key.endswith(("_ids", "_keys")) else np.float64
        return np.concatenate([np.zeros((0, *shape), dtype)] + [block[key].reshape(-1, *shape) for block in blocks])

    ids, voxels, positions = _add_up(stacked("segment_ids"), stacked("segment_positions", (3,)),
                                     counts=stacked("segment_voxels"))
    keys, edge_pairs, edge_sums, edge_positions = _add_up(stacked("edge_keys", (2,)), stacked("edge_sums"),
                                                          stacked("edge_positions", (3,)),
                                                          counts=stacked("edge_pairs"))
    edges = [(int(k[0]), int(k[1]), *(float(x) for x in where / n), int(n), float(v / n))
             for k, n, v, where in zip(keys, edge_pairs, edge_sums, edge_positions)]
    # each edge's pairs to both its segments (every segment of an edge was
    # counted by some block)
    at = np.searchsorted(ids, keys.reshape(-1))
    segment_pairs = np.bincount(at, weights=np.repeat(edge_pairs, 2), minlength=len(ids)).astype(np.int64)
    segment_sums = np.bincount(at, weights=np.repeat(edge_sums, 2), minlength=len(ids))
    segments = [(int(i), int(n), *(float(x) for x in where / n), int(p), float(v / p) if p else 0.0)
                for i, n, where, p, v in zip(ids, voxels, positions, segment_pairs, segment_sums)]
    segments.sort(key=lambda row: (-row[-1], row[0]))
    edges.sort(key=lambda row: (-row[-1], row[0], row[1]))
    return segments, edges


def proofread_run(config, layout: RunLayout, run_dir: RunDir, progress: ProgressLog, report: dict) -> dict:
    """Runs the proofread task (workers/proofread.py), adds up its blocks,
    writes the two CSV tables and returns the report's entry."""
    shutil.rmtree(run_dir.proofreading, ignore_errors=True)
    (run_dir.proofreading / "blocks").mkdir(parents=True)
    run_daisy(proofread_task(config, layout, run_dir), progress, report, run_dir.logs)
    blocks = []
    for path in sorted((run_dir.proofreading / "blocks").glob("*.npz")):
        with np.load(path) as block:
            blocks.append(dict(block))
    segments, edges = merge(blocks)
    for name, columns, rows in (("segments", SEGMENT_COLUMNS, segments), ("edges", EDGE_COLUMNS, edges)):
        path = run_dir.proofreading / f"{name}.csv"
        with open(path.with_suffix(".csv.tmp"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(rows)
        path.with_suffix(".csv.tmp").replace(path)
    entry = {
        "segments_csv": str(run_dir.proofreading / "segments.csv"),
        "edges_csv": str(run_dir.proofreading / "edges.csv"),
        "segments": [dict(zip(SEGMENT_COLUMNS, row)) for row in segments[:TOP]],
        "edges": [dict(zip(EDGE_COLUMNS, row)) for row in edges[:TOP]],
    }
    write_atomically(run_dir.proofreading / "top.json", json.dumps(entry, indent=2))
    return entry
