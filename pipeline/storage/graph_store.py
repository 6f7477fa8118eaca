"""The region-adjacency graph store: one interface, SQLite and MongoDB behind it.

Contract (design.md, Storage):
- nodes: id (unique), center (world units, z y x), size, block;
- edges: u < v (unique pair), merge_score (NaN/missing = never merge),
  per-offset mean affinities, block;
- every write replaces a whole block atomically enough that a worker dying
  halfway leaves nothing that a re-run of the block does not overwrite:
  SQLite deletes and inserts in one transaction; MongoDB (no multi-document
  transactions on a standalone server) deletes by block and then inserts,
  and the block is only marked done by daisy after both returned;
- reads go by the indexed `block` field, never by bounding-box scans.

Ids are below 2^53 (asserted where they are made), so they fit the signed
64-bit integers of both backends and survive JSON.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from pipeline.errors import UserError
from pipeline.storage.credentials import hide_in, masked, password, split_password, with_password

EDGE_CHUNK = 100_000
# portable MongoDB database names: no slash, backslash, dot, quote, dollar or
# space, and under the 64-byte limit
VALID_DATABASE = re.compile(r"[A-Za-z0-9_-]{1,63}")
# seconds a MongoDB server may stall before a request fails (RunConfig.store_timeout_s)
STORE_TIMEOUT_S = 120
# seconds the master waits to reach the server when a run starts: a wrong
# host or port is then reported at once, not after store_timeout_s. A
# replica-set election, the longest a healthy server is away, takes about 12 s
FIRST_CONTACT_S = 15


def _client_options(timeout_s: float) -> dict:
    # a stalled server (frozen, partitioned) must turn into a failed, retried
    # block, not a worker that waits forever: pymongo has no socket timeout
    # by default. Reads and writes retry once by themselves on a new
    # connection or primary, and `_retry` adds back-off on top.
    ms = int(timeout_s * 1000)
    return {
        "serverSelectionTimeoutMS": ms,
        "connectTimeoutMS": ms,
        "socketTimeoutMS": ms,
        "retryWrites": True,
        "retryReads": True,
    }


# blocks per request when the master reads the whole graph (MongoDB): the
# unit a failed read is retried in, and about 1e6 edges (some 300 MB as
# Python dicts) at Kasthuri15's density of about 3e4 edges per block
BLOCK_RANGE = 32
# ranges requested at once by a whole-graph read (4 x some 300 MB of
# documents held at Kasthuri15's density)
READERS = 4
# block indices per `$in` query: 8-byte ints keep a query far below MongoDB's
# 16 MB document limit
IN_CHUNK = 50_000


@dataclass
class Nodes:
    ids: np.ndarray  # uint64 (N,)
    centers: np.ndarray  # float64 (N, 3), world units
    sizes: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Edges:
    u: np.ndarray  # uint64 (E,), u < v
    v: np.ndarray  # uint64 (E,)
    scores: np.ndarray  # float32 (E,), NaN = never merge
    affinities: np.ndarray  # float32 (E, C), NaN where an offset never links u and v

    def __len__(self) -> int:
        return len(self.u)


@dataclass(frozen=True)
class RunOwner:
    """The run a store's graph belongs to, recorded inside the store: runs
    sharing one server must never read or reset each other's graph."""

    id: str  # made once per run directory (`layout.json`)
    run_dir: str
    host: str

    def to_json(self) -> dict:
        return {"id": self.id, "run_dir": self.run_dir, "host": self.host}


class GraphStore(ABC):
    # what messages call the store: a file or a database
    name: str

    @abstractmethod
    def reset(self) -> None:
        """Drop every node and edge (a fresh run)."""

    @abstractmethod
    def _recorded_owner(self) -> dict | None:
        """The owner recorded in the store, or None."""

    @abstractmethod
    def _record_owner(self, owner: RunOwner) -> None:
        """Record `owner` unless one is recorded already (racing masters:
        the first one wins; the others find it in `claim`)."""

    @abstractmethod
    def _holds_graph(self) -> bool: ...

    def check_owner(self, owner: RunOwner) -> None:
        """Refuse, in one line, a store that belongs to another run or that
        holds a graph no run has claimed. Writes nothing."""
        recorded = self._recorded_owner()
        if recorded is None:
            if self._holds_graph():
                raise UserError(
                    f"store: {self.name} holds a graph that no run has claimed; affseg never resets it: "
                    f"name another database in the store URI, or drop that one"
                )
        elif recorded["id"] != owner.id:
            raise UserError(
                f"store: {self.name} belongs to the run in {recorded['run_dir']} on {recorded['host']}, not to "
                f"{owner.run_dir}; runs never share or reset each other's graph: name another database in the store URI"
            )

    def claim(self, owner: RunOwner) -> bool:
        """Make `owner` the store's run. Returns False when the store had
        no record of it: a resumed run whose graph was lost (a dropped
        database, a deleted graph.sqlite) must redo the graph steps."""
        self.check_owner(owner)
        if self._recorded_owner() is not None:
            return True
        self._record_owner(owner)
        self.check_owner(owner)
        return False

    @abstractmethod
    def write_nodes(self, block: int, nodes: Nodes) -> None:
        """Replace the nodes of `block`."""

    @abstractmethod
    def write_edges(self, block: int, edges: Edges) -> None:
        """Replace the edges owned by `block`."""

    @abstractmethod
    def read_nodes(self, blocks: list[int]) -> Nodes: ...

    @abstractmethod
    def read_edges(self, blocks: list[int]) -> Edges: ...

    @abstractmethod
    def node_ids(self) -> np.ndarray:
        """All node ids, sorted."""

    @abstractmethod
    def stream_edges(self, chunk: int = EDGE_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(u, v, merge_score) in numpy chunks, for building look-up tables."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> GraphStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_ids(ids: np.ndarray) -> None:
    if len(ids) and int(ids.max()) >= 2**53:
        raise ValueError("graph ids must stay below 2^53")


class SqliteGraphStore(GraphStore):
    """The embedded default: one file, safe for several local worker processes
    (WAL journal, writers wait for the lock instead of failing)."""

    def __init__(self, path: Path):
        self.path = path
        self.name = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(path, timeout=600, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as e:
            raise UserError(f"store: {path} is not a usable SQLite database ({e}); delete the run directory to start again") from e
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS nodes (
                id INTEGER PRIMARY KEY, z REAL, y REAL, x REAL, size INTEGER, block INTEGER);
            CREATE INDEX IF NOT EXISTS nodes_block ON nodes(block);
            CREATE TABLE IF NOT EXISTS edges (
                u INTEGER, v INTEGER, merge_score REAL, affinities BLOB, block INTEGER,
                PRIMARY KEY (u, v)) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS edges_block ON edges(block);
            CREATE TABLE IF NOT EXISTS owner (one INTEGER PRIMARY KEY CHECK (one = 1), record TEXT);
            """
        )

    def reset(self) -> None:
        self.db.execute("DELETE FROM nodes")
        self.db.execute("DELETE FROM edges")

    def _recorded_owner(self) -> dict | None:
        row = self.db.execute("SELECT record FROM owner").fetchone()
        return None if row is None else json.loads(row[0])

    def _record_owner(self, owner: RunOwner) -> None:
        self.db.execute("INSERT OR IGNORE INTO owner VALUES (1, ?)", (json.dumps(owner.to_json()),))

    def _holds_graph(self) -> bool:
        return self.db.execute("SELECT EXISTS (SELECT 1 FROM nodes) OR EXISTS (SELECT 1 FROM edges)").fetchone()[0] == 1

    def _replace(self, table: str, block: int, columns: str, rows) -> None:
        marks = ",".join("?" * (columns.count(",") + 1))
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(f"DELETE FROM {table} WHERE block = ?", (block,))
            self.db.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)
            self.db.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself on some errors ("database or disk
            # is full"); a second ROLLBACK would fail and hide that cause
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def write_nodes(self, block: int, nodes: Nodes) -> None:
        _check_ids(nodes.ids)
        # .tolist() converts whole columns at C speed; per-element int()
        # and float() calls would dominate the write
        centers = nodes.centers.T.tolist() if len(nodes) else [[], [], []]
        rows = zip(nodes.ids.tolist(), *centers, nodes.sizes.tolist(), [block] * len(nodes))
        self._replace("nodes", block, "id,z,y,x,size,block", rows)

    def write_edges(self, block: int, edges: Edges) -> None:
        _check_ids(edges.v)
        width = edges.affinities.shape[1] * 4 if len(edges) else 0
        packed = np.ascontiguousarray(edges.affinities, dtype=np.float32).tobytes()
        blobs = (packed[i : i + width] for i in range(0, len(packed), width)) if width else ()
        # NaN scores are stored as NULL: "never merge"
        scores = [None if s != s else s for s in edges.scores.tolist()]
        rows = zip(edges.u.tolist(), edges.v.tolist(), scores, blobs, [block] * len(edges))
        self._replace("edges", block, "u,v,merge_score,affinities,block", rows)

    def _in_blocks(self, query: str, blocks: list[int]) -> list[tuple]:
        rows: list[tuple] = []
        for start in range(0, len(blocks), 900):  # SQLite's host-parameter limit
            chunk = blocks[start : start + 900]
            rows += self.db.execute(query.format(",".join("?" * len(chunk))), chunk).fetchall()
        return rows

    def read_nodes(self, blocks: list[int]) -> Nodes:
        rows = self._in_blocks("SELECT id, z, y, x, size FROM nodes WHERE block IN ({}) ORDER BY id", blocks)
        return _nodes_from_rows([(r[0], r[1:4], r[4]) for r in rows])

    def read_edges(self, blocks: list[int]) -> Edges:
        rows = self._in_blocks(
            "SELECT u, v, merge_score, affinities FROM edges WHERE block IN ({}) ORDER BY u, v", blocks
        )
        return _edges_from_rows([(u, v, s, np.frombuffer(a, dtype=np.float32)) for u, v, s, a in rows])

    def node_ids(self) -> np.ndarray:
        # chunk by chunk into numpy: a list of 1e8 row tuples would take GBs
        cursor = self.db.execute("SELECT id FROM nodes ORDER BY id")
        chunks = [np.array(rows, dtype=np.uint64).ravel() for rows in iter(lambda: cursor.fetchmany(EDGE_CHUNK), [])]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint64)

    def stream_edges(self, chunk: int = EDGE_CHUNK):
        cursor = self.db.execute("SELECT u, v, merge_score FROM edges")
        while rows := cursor.fetchmany(chunk):
            yield _edge_arrays(rows)

    def close(self) -> None:
        self.db.close()


class MongoGraphStore(GraphStore):
    """For clusters where many workers write at once. One client per worker
    process (the store is opened once in a worker's set-up), bulk writes,
    retries with back-off on transient connection errors."""

    RETRIES = 5

    def __init__(self, uri: str, default_database: str, secret: str | None = None, timeout_s: float = STORE_TIMEOUT_S,
                 reach_s: float | None = None):
        import pymongo
        from pymongo.errors import PyMongoError

        name = urlparse(uri).path.strip("/") or default_database
        if not VALID_DATABASE.fullmatch(name):
            raise UserError(
                f"store: {name!r} is not a valid MongoDB database name (at most 63 letters, digits, '_' and '-')"
            )
        self._pymongo = pymongo
        bare, inline = split_password(uri)
        secret = inline or secret
        # messages name the URI with `***` for a password
        self.uri = masked(with_password(bare, secret))
        try:
            self.client = pymongo.MongoClient(with_password(bare, secret), **_client_options(timeout_s))
        except (PyMongoError, ValueError) as e:  # pymongo checks the URI's syntax here
            raise UserError(f"store: not a valid MongoDB URI: {hide_in(str(e), secret)}") from e
        try:
            with pymongo.timeout(min(reach_s or timeout_s, timeout_s)):
                self.client.admin.command("ping")
        except PyMongoError as e:
            self.client.close()
            reason = "authentication failed" if isinstance(e, pymongo.errors.OperationFailure) and e.code == 18 else type(e).__name__
            raise UserError(f"store: cannot reach MongoDB at {self.uri}: {reason}") from e
        self.db = self.client[name]
        self.name = f"MongoDB database {name!r}"
        self.nodes = self.db["nodes"]
        self.edges = self.db["edges"]
        self.owner = self.db["owner"]
        self._retry(lambda: self.nodes.create_index("block"))
        self._retry(lambda: self.edges.create_index([("u", 1), ("v", 1)], unique=True))
        self._retry(lambda: self.edges.create_index("block"))

    def _retry(self, operation):
        from pymongo.errors import AutoReconnect, NetworkTimeout

        for attempt in range(self.RETRIES):
            try:
                return operation()
            except (AutoReconnect, NetworkTimeout):
                if attempt == self.RETRIES - 1:
                    raise
                time.sleep(0.5 * 2**attempt)

    def reset(self) -> None:
        self._retry(lambda: self.nodes.delete_many({}))
        self._retry(lambda: self.edges.delete_many({}))

    def _recorded_owner(self) -> dict | None:
        return self._retry(lambda: self.owner.find_one({"_id": "owner"}, {"_id": 0}))

    def _record_owner(self, owner: RunOwner) -> None:
        from pymongo.errors import DuplicateKeyError

        try:
            self._retry(lambda: self.owner.insert_one({"_id": "owner", **owner.to_json()}))
        except DuplicateKeyError:
            pass

    def _holds_graph(self) -> bool:
        return any(self._retry(lambda: c.find_one({}, {"_id": 1})) is not None for c in (self.nodes, self.edges))

    def _replace(self, collection, block: int, documents: list[dict]) -> None:
        # delete and insert retry as a pair: a retried insert may otherwise
        # meet half of its own earlier attempt
        def replace():
            collection.delete_many({"block": block})
            if documents:
                collection.insert_many(documents, ordered=False)

        self._retry(replace)

    def write_nodes(self, block: int, nodes: Nodes) -> None:
        _check_ids(nodes.ids)
        documents = [
            {"_id": i, "center": c, "size": s, "block": block}
            for i, c, s in zip(nodes.ids.tolist(), nodes.centers.tolist(), nodes.sizes.tolist())
        ]
        self._replace(self.nodes, block, documents)

    def write_edges(self, block: int, edges: Edges) -> None:
        _check_ids(edges.v)
        documents = [
            {"u": u, "v": v, "merge_score": None if s != s else s, "affinities": a, "block": block}
            for u, v, s, a in zip(
                edges.u.tolist(), edges.v.tolist(), edges.scores.tolist(), edges.affinities.tolist()
            )
        ]
        self._replace(self.edges, block, documents)

    def _find_in_blocks(self, collection, blocks: list[int], projection: dict) -> list[dict]:
        documents: list[dict] = []
        for start in range(0, len(blocks), IN_CHUNK):
            chunk = blocks[start : start + IN_CHUNK]
            documents += self._retry(lambda: list(collection.find({"block": {"$in": chunk}}, projection)))
        return documents

    def read_nodes(self, blocks: list[int]) -> Nodes:
        documents = self._find_in_blocks(self.nodes, blocks, {"center": 1, "size": 1})
        documents.sort(key=lambda d: d["_id"])
        return _nodes_from_rows([(d["_id"], d["center"], d["size"]) for d in documents])

    def read_edges(self, blocks: list[int]) -> Edges:
        documents = self._find_in_blocks(self.edges, blocks, {"_id": 0, "u": 1, "v": 1, "merge_score": 1, "affinities": 1})
        documents.sort(key=lambda d: (d["u"], d["v"]))
        return _edges_from_rows([(d["u"], d["v"], d["merge_score"], d["affinities"]) for d in documents])

    def _block_ranges(self, collection) -> Iterator[tuple[int, int]]:
        """[first, end) ranges of BLOCK_RANGE block indices up to the last
        block that holds a document of `collection`."""
        last = self._retry(lambda: collection.find_one({}, {"block": 1}, sort=[("block", -1)]))
        if last is None:
            return
        for first in range(0, last["block"] + 1, BLOCK_RANGE):
            yield first, first + BLOCK_RANGE

    def _read_range(self, collection, first: int, end: int, projection: dict, sort: list | None = None) -> list[dict]:
        # one range is one retried request: a failure mid-stream re-reads
        # that range only, never the whole graph
        query = {"block": {"$gte": first, "$lt": end}}
        return self._retry(lambda: list(collection.find(query, projection, sort=sort)))

    def _read_ranges(self, collection, projection: dict, sort: list | None = None) -> Iterator[list[dict]]:
        """Each range's documents (`_read_range`), in range order, with
        READERS requests in flight: the server answers the next ranges
        while this process decodes one."""
        with ThreadPoolExecutor(READERS) as pool:
            pending: deque = deque()
            for first, end in self._block_ranges(collection):
                pending.append(pool.submit(self._read_range, collection, first, end, projection, sort))
                if len(pending) == READERS:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def node_ids(self) -> np.ndarray:
        # block by block: a block's ids are below the next block's, so
        # ranges sorted by id concatenate sorted
        chunks = [
            np.array([d["_id"] for d in documents], dtype=np.uint64)
            for documents in self._read_ranges(self.nodes, {"_id": 1}, sort=[("_id", 1)])
        ]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint64)

    def stream_edges(self, chunk: int = EDGE_CHUNK):
        projection = {"_id": 0, "u": 1, "v": 1, "merge_score": 1}
        for documents in self._read_ranges(self.edges, projection):
            for start in range(0, len(documents), chunk):
                yield _edge_arrays([(d["u"], d["v"], d["merge_score"]) for d in documents[start : start + chunk]])

    def close(self) -> None:
        self.client.close()


def _nodes_from_rows(rows: list[tuple]) -> Nodes:
    return Nodes(
        ids=np.array([r[0] for r in rows], dtype=np.uint64),
        centers=np.array([r[1] for r in rows], dtype=np.float64).reshape(-1, 3),
        sizes=np.array([r[2] for r in rows], dtype=np.int64),
    )


def _edges_from_rows(rows: list[tuple]) -> Edges:
    u, v, s = _edge_arrays([r[:3] for r in rows])
    affinities = np.array([r[3] for r in rows], dtype=np.float32)
    return Edges(u, v, s, affinities.reshape(len(rows), -1))


def _edge_arrays(rows: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u = np.fromiter((r[0] for r in rows), dtype=np.uint64, count=len(rows))
    v = np.fromiter((r[1] for r in rows), dtype=np.uint64, count=len(rows))
    s = np.fromiter((np.nan if r[2] is None else r[2] for r in rows), dtype=np.float32, count=len(rows))
    return u, v, s


def default_database(run_dir: Path, run_id: str) -> str:
    """A database name that no other run can have (the run's id) and that
    a person can still recognise (the run directory's name, cut down to
    the characters MongoDB allows)."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", run_dir.name).strip("_")[:24]
    return f"affseg_{readable}_{run_id[:16]}" if readable else f"affseg_{run_id[:16]}"


def open_store(store: str, run_dir: Path, run_id: str, password_file: str | None = None,
               timeout_s: float = STORE_TIMEOUT_S, reach_s: float | None = None) -> GraphStore:
    """`store` is a RunConfig.store value: 'sqlite' or a MongoDB URI; a URI
    without a database gets the run's own (`default_database`). A password
    not in the URI comes from the environment or `password_file`
    (pipeline/storage/credentials.py). `reach_s` bounds the wait for the
    server's first answer (default: `timeout_s`)."""
    if store == "sqlite":
        return SqliteGraphStore(run_dir / "graph.sqlite")
    secret = password(Path(password_file) if password_file else None)
    return MongoGraphStore(store, default_database=default_database(run_dir, run_id), secret=secret, timeout_s=timeout_s,
                           reach_s=reach_s)
