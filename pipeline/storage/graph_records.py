"""What the graph store keeps of a block: one record of compressed columns.

A block's nodes are one record (ids, centres, sizes) and the edges it owns
another (u, v and each named edge attribute). Both backends store the same
records through this module: SQLite a row with one BLOB, MongoDB a document
with a binary field per column (pipeline/storage/graph_store.py). A record
that would pass `PART_BYTES` is split by rows into parts, each a record of
its own, so that no MongoDB document nears the 16 MB limit.

Columns are compressed one by one (Blosc zstd with byte shuffle), so a
reader decodes only the columns it asks for: the look-up tables need u, v
and the merge score, not the per-offset affinities. Sorted ids are stored
as differences (node ids: +1 each; edges sorted by (u, v): u mostly +0 or
+1, v as v - u), which compress to a fraction of a byte.

Edge attributes are declared once, in EDGE_ATTRIBUTES: a step that adds one
(the mutex watershed's evidence, an uncertainty) adds a line there, and
both backends store and read it with no schema of their own to edit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from numcodecs import Blosc

from pipeline.kernels.compiled.records import runs_decode, runs_encode

# the largest record kept whole: half MongoDB's 16 MB document limit leaves
# room for the document's own fields whatever the codec does
PART_BYTES = 8 * 2**20
# zstd at its fastest level, with byte shuffle: on the sample's graph 7.4
# bytes per edge at 12 offsets, encoded at about 200 MB/s and decoded at
# about 1.4 GB/s on this VM (benchmarks/scale.py); lz4 is faster but
# 11.8 bytes per edge
CODEC = Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE)


@dataclass(frozen=True)
class Attribute:
    """A named edge attribute: one value per edge, or one per offset of the
    run (`per_offset`). With `where`, the values are kept only where that
    boolean per-offset attribute is true, and read back as 0 elsewhere."""

    dtype: type
    meaning: str
    per_offset: bool = False
    where: str | None = None


EDGE_ATTRIBUTES: dict[str, Attribute] = {
    "merge_score": Attribute(np.float32, "the score at which the agglomeration first joined u and v; NaN: never"),
    "linked": Attribute(np.bool_, "some voxel pair (i, i + offset) links u and v", per_offset=True),
    "affinities": Attribute(np.uint8, "the mean uint8 affinity of the voxel pairs that link u and v",
                            per_offset=True, where="linked"),
    "pairs": Attribute(np.uint32, "the number of voxel pairs that link u and v (partition mutex_3d)",
                       per_offset=True, where="linked"),
    "uncertainty": Attribute(np.float32, "a model's mean uncertainty (the latent-mask method's MaskAggr variance) "
                                         "over the nearest-neighbour voxel pairs that link u and v; NaN: none do "
                                         "(partition mutex_3d)"),
}


@dataclass
class Nodes:
    ids: np.ndarray  # uint64 (N,), sorted
    # (N, 3), world units; kept as float32: 7 digits, 0.004 nm at
    # Kasthuri15's 55 um extent, and half the bytes of a node
    centers: np.ndarray
    sizes: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Edges:
    u: np.ndarray  # uint64 (E,), u < v
    v: np.ndarray  # uint64 (E,)
    attributes: dict[str, np.ndarray] = field(default_factory=dict)  # EDGE_ATTRIBUTES' names

    def __len__(self) -> int:
        return len(self.u)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.attributes[name]

    def select(self, rows: np.ndarray) -> Edges:
        """The edges at `rows` (a boolean mask or indices), all attributes."""
        return Edges(self.u[rows], self.v[rows], {k: a[rows] for k, a in self.attributes.items()})


@dataclass
class Record:
    """One block's nodes or edges (or a part of them), encoded: `meta` says
    each column's dtype, shape, codec and size; `columns` holds its bytes."""

    block: int
    part: int
    meta: dict
    columns: dict[str, bytes]  # or memoryview slices of one SQLite BLOB

    def meta_json(self) -> str:
        return json.dumps(self.meta, separators=(",", ":"))


def _check_ids(ids: np.ndarray) -> None:
    # ids fit the signed 64-bit integers of both backends' indices and JSON
    if len(ids) and int(ids.max()) >= 2**53:
        raise ValueError("graph ids must stay below 2^53")


# Column codecs (before compression). "on" names the column a codec is
# coded against, which is decoded first:
# - plain: the values;
# - delta: sorted ids as differences from the previous one;
# - runs (on u): v of edges sorted by (u, v): v - u at the first edge of u,
#   then the difference from the previous v (0.9 bytes per edge on the
#   sample's graph, against 1.3 for v - u throughout);
# - bits: booleans, packed 8 to a byte;
# - where (on a boolean column): the values where it is true.


def _encode_column(values: np.ndarray, codec: str, on: np.ndarray | None) -> bytes:
    if values.ndim == 2:
        # per-offset columns offset by offset: one offset's values are alike
        # (the long-range ones mostly unlinked), which compresses better
        values = np.ascontiguousarray(values.T)
        on = None if on is None else np.ascontiguousarray(on.T)
    if codec == "delta":  # ids are unsigned: differences of sorted ones are too
        values = np.diff(values, prepend=values.dtype.type(0))
    elif codec == "runs":
        coded = np.empty(len(values), dtype=np.uint64)
        runs_encode(on, values, coded)
        values = coded
    elif codec == "bits":
        values = np.packbits(values.ravel())
    elif codec == "where":
        values = values[on]
    return CODEC.encode(np.ascontiguousarray(values)) if values.size else b""


def _decode_column(data: bytes, spec: dict, on: np.ndarray | None) -> np.ndarray:
    dtype, shape, codec = np.dtype(spec["dtype"]), tuple(spec["shape"]), spec["codec"]
    if len(shape) == 2:  # stored offset by offset (_encode_column)
        return _decode_flat(data, dtype, shape[::-1], codec, None if on is None else on.T).T
    return _decode_flat(data, dtype, shape, codec, on)


def _decode_flat(data: bytes, dtype: np.dtype, shape: tuple, codec: str, on: np.ndarray | None) -> np.ndarray:
    count = int(np.prod(shape))
    # decoded straight into the array it becomes: no copy of the bytes
    stored = {"bits": ((count + 7) // 8, np.uint8),
              "where": (int(np.count_nonzero(on)) if on is not None else 0, dtype)}.get(codec, (count, dtype))
    raw = np.empty(stored[0], dtype=stored[1])
    if raw.size:
        CODEC.decode(data, out=raw)
    if codec == "delta":
        return np.cumsum(raw, out=raw).reshape(shape)
    if codec == "runs":
        runs_decode(on, raw, raw)
        return raw
    if codec == "bits":
        return np.unpackbits(raw, count=count).view(bool).reshape(shape)
    if codec == "where":
        out = np.zeros(shape, dtype=dtype)
        out[on] = raw
        return out
    return raw.reshape(shape)


def _encode(block: int, columns: list[tuple[str, np.ndarray, str, str | None]]) -> list[Record]:
    """Records of the (name, values, codec, "on" column) columns of one
    block, split by rows where one record would pass PART_BYTES."""
    rows = len(columns[0][1])
    pieces = [(0, rows)] if rows else []  # a block without nodes or edges has no record
    records: list[Record] = []
    while pieces:
        start, end = pieces.pop(0)
        arrays = {name: values[start:end] for name, values, _, _ in columns}
        data, specs = {}, []
        for name, values, codec, on in columns:
            data[name] = _encode_column(arrays[name], codec, arrays[on] if on else None)
            specs.append({"name": name, "dtype": values.dtype.str, "shape": list(arrays[name].shape), "codec": codec,
                          "on": on, "bytes": len(data[name])})
        if sum(map(len, data.values())) > PART_BYTES and end - start > 1:
            middle = (start + end) // 2
            pieces[:0] = [(start, middle), (middle, end)]
            continue
        records.append(Record(block, len(records), {"rows": end - start, "columns": specs}, data))
    return records


def encode_nodes(block: int, nodes: Nodes) -> list[Record]:
    _check_ids(nodes.ids)
    ids = np.asarray(nodes.ids, dtype=np.uint64)
    order = slice(None) if np.all(ids[1:] > ids[:-1]) else np.argsort(ids, kind="stable")
    return _encode(block, [
        ("id", ids[order], "delta", None),
        ("center", np.asarray(nodes.centers, dtype=np.float32).reshape(-1, 3)[order], "plain", None),
        ("size", np.asarray(nodes.sizes, dtype=np.int64)[order], "plain", None),
    ])


def encode_edges(block: int, edges: Edges) -> list[Record]:
    """The edges' records, sorted by (u, v). Every attribute must be
    declared in EDGE_ATTRIBUTES with its dtype; per-offset ones all have
    the same number of columns (the run's offsets)."""
    channels = None
    u, v = np.asarray(edges.u, dtype=np.uint64), np.asarray(edges.v, dtype=np.uint64)
    _check_ids(v)
    if len(u) and not np.all(u < v):
        raise ValueError("edges must have u < v")
    for name, values in edges.attributes.items():
        declared = EDGE_ATTRIBUTES.get(name)
        if declared is None:
            raise ValueError(f"edge attribute {name!r} is not declared in EDGE_ATTRIBUTES")
        if values.dtype != np.dtype(declared.dtype) or len(values) != len(u):
            raise ValueError(f"edge attribute {name!r}: {len(values)} values of {values.dtype}, "
                             f"expected {len(u)} of {np.dtype(declared.dtype)}")
        if declared.per_offset:
            channels = values.shape[1] if channels is None else channels
            if values.ndim != 2 or values.shape[1] != channels:
                raise ValueError(f"edge attribute {name!r}: shape {values.shape}, expected ({len(u)}, {channels})")
        elif values.ndim != 1:
            raise ValueError(f"edge attribute {name!r} holds one value per edge, not {values.shape[1:]}")
        if declared.where and declared.where not in edges.attributes:
            raise ValueError(f"edge attribute {name!r} is kept where {declared.where!r} is true: write both")
    # sorted by (u, v) already, as the agglomerate step writes them: no sort
    sorted_ = np.all((u[1:] > u[:-1]) | ((u[1:] == u[:-1]) & (v[1:] > v[:-1])))
    order = slice(None) if sorted_ else np.lexsort((v, u))
    # a `where` attribute's mask is encoded before it
    names = sorted(edges.attributes, key=lambda n: (EDGE_ATTRIBUTES[n].where is not None, n))
    columns = [("u", u[order], "delta", None), ("v", v[order], "runs", "u")]
    for name in names:
        values = edges.attributes[name][order]
        declared = EDGE_ATTRIBUTES[name]
        codec = "bits" if values.dtype == np.bool_ else "where" if declared.where else "plain"
        columns.append((name, values, codec, declared.where))
    return _encode(block, columns)


def decode(record: Record, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The record's columns named `names` (default: all of them), with the
    columns they are coded on decoded first."""
    specs = {spec["name"]: spec for spec in record.meta["columns"]}
    wanted = list(specs) if names is None else names
    out: dict[str, np.ndarray] = {}

    def column(name: str) -> np.ndarray:
        if name not in out:
            if name not in specs:
                raise KeyError(f"the graph store's records hold no {name!r}")
            spec = specs[name]
            out[name] = _decode_column(record.columns[name], spec, column(spec["on"]) if spec["on"] else None)
        return out[name]

    for name in wanted:
        column(name)
    return {name: out[name] for name in wanted}


def columns_needed(names: list[str]) -> list[str]:
    """`names` and the masks their `where` columns are decoded with."""
    needed = list(names)
    for name in names:
        declared = EDGE_ATTRIBUTES.get(name)
        if declared is not None and declared.where and declared.where not in needed:
            needed.append(declared.where)
    return needed


def nodes_of(records: list[Record]) -> Nodes:
    parts = [decode(r) for r in records]
    if not parts:
        return Nodes(np.zeros(0, np.uint64), np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    nodes = Nodes(*(np.concatenate([p[k] for p in parts]) for k in ("id", "center", "size")))
    order = np.argsort(nodes.ids, kind="stable")
    return Nodes(nodes.ids[order], nodes.centers[order], nodes.sizes[order])


def edges_of(records: list[Record], attributes: list[str], sort: bool = True, map=map) -> Edges:
    """The edges of `records` with `attributes`, sorted by (u, v) (`sort`);
    `map` decodes the records (a thread pool's: Blosc works without the GIL)."""
    if not records:
        return Edges(np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                     {name: np.zeros((0, 0) if EDGE_ATTRIBUTES[name].per_offset else (0,), EDGE_ATTRIBUTES[name].dtype)
                      for name in attributes})
    parts = list(map(lambda r: decode(r, ["u", "v", *attributes]), records))
    edges = Edges(np.concatenate([p["u"] for p in parts]), np.concatenate([p["v"] for p in parts]),
                  {name: np.concatenate([p[name] for p in parts]) for name in attributes})
    if sort and len(parts) > 1:
        edges = edges.select(np.lexsort((edges.v, edges.u)))
    return edges
