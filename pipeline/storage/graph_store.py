"""The region-adjacency graph store: one interface, SQLite and MongoDB behind it.

Contract (design.md, Storage):
- a block's nodes (id, centre in world units z y x, size) are one record,
  and the edges it owns (u < v, the named attributes of
  pipeline/storage/graph_records.py: merge score, per-offset affinities,
  ...) another: compressed columns, split into parts below MongoDB's
  document limit. SQLite keeps a row per record, MongoDB a document;
- every write replaces a whole block, so a retried or re-run block never
  duplicates a node or an edge: SQLite deletes and inserts in one
  transaction; MongoDB (no multi-document transactions on a standalone
  server) deletes by block and then inserts, and the block is only marked
  done by daisy after both returned;
- reads go by the indexed `block` field; the master streams every record
  straight into numpy, decoding only the columns it asks for.

Ids are below 2^53 (asserted where they are encoded), so they fit the
signed 64-bit integers of both backends and survive JSON.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from pipeline.errors import StoreLost, UserError
from pipeline.storage.graph_records import Edges, Nodes, Record, columns_needed, decode, edges_of, encode_edges, encode_nodes, nodes_of
from pipeline.storage.credentials import hide_in, masked, password, split_password, with_password

# edges per chunk a whole-graph stream yields (records are joined up to it)
EDGE_CHUNK = 1_000_000
# the layout of the records, kept in the store: a store of another layout
# is refused instead of misread (2: a record per block; 1, unrecorded: a
# row or document per node and edge)
LAYOUT = 2
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
# unit a failed read is retried in; at Kasthuri15's density of about 3e4
# edges per block some 1e6 edges, 7 MB of records
BLOCK_RANGE = 32
# ranges requested at once by a whole-graph read
READERS = 4
# block indices per `$in` query: 8-byte ints keep a query far below MongoDB's
# 16 MB document limit
IN_CHUNK = 50_000
# SQLite rows fetched at a time by a whole-graph read
ROWS = 256
# threads that decode a whole-graph stream's records (Blosc and numpy's
# large operations run without the GIL): 1.3 to 2x the edges/s of one on
# this 2-core VM
DECODERS = 2
NODE_COLUMNS = ["id", "center", "size"]


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

    def check_holds_run(self, run_id: str) -> None:
        """Before the master reads the whole graph: the owner record is
        written once, at the run's start, so a store without it lost the
        run's graph since (a dropped database, a server back without its
        data, a deleted graph.sqlite) and holds at most the blocks written
        after; read, it gives a wrong segmentation without a word."""
        recorded = self._recorded_owner()
        if recorded is None or recorded["id"] != run_id:
            # the blocks written since are in it, unclaimed: the re-run
            # refuses such a store until it is emptied (check_owner)
            raise StoreLost(f"store: {self.name} lost this run's graph during the run (its owner record is gone); "
                            f"empty it (drop the database, or delete graph.sqlite) and re-run the same command: "
                            f"the run then redoes its graph steps")

    @abstractmethod
    def _replace(self, kind: str, block: int, records: list[Record]) -> None:
        """Replace every record of `block` of `kind` ('nodes' or 'edges')."""

    @abstractmethod
    def _read(self, kind: str, blocks: list[int], columns: list[str]) -> list[Record]:
        """The records of `blocks`, with `columns` only, in (block, part) order."""

    @abstractmethod
    def _stream(self, kind: str, columns: list[str]) -> Iterator[list[Record]]:
        """Every record of `kind`, with `columns` only, in (block, part)
        order, a bounded batch at a time."""

    def write_nodes(self, block: int, nodes: Nodes) -> None:
        """Replace the nodes of `block`."""
        self._replace("nodes", block, encode_nodes(block, nodes))

    def write_edges(self, block: int, edges: Edges) -> None:
        """Replace the edges owned by `block`, with their attributes."""
        self._replace("edges", block, encode_edges(block, edges))

    def read_nodes(self, blocks: list[int]) -> Nodes:
        return nodes_of(self._read("nodes", blocks, NODE_COLUMNS))

    def read_edges(self, blocks: list[int], attributes: list[str]) -> Edges:
        """The edges of `blocks`, sorted by (u, v), with `attributes`."""
        return edges_of(self._read("edges", blocks, ["u", "v", *columns_needed(attributes)]), attributes)

    def node_ids(self) -> np.ndarray:
        """All node ids, sorted."""
        return self._node_columns(["id"])["id"]

    def node_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """All node ids, sorted, and each node's size (voxels)."""
        columns = self._node_columns(["id", "size"])
        return columns["id"], columns["size"]

    def _node_columns(self, names: list[str]) -> dict[str, np.ndarray]:
        parts = [decode(r, names) for batch in self._stream("nodes", names) for r in batch]
        empty = {"id": np.zeros(0, dtype=np.uint64), "size": np.zeros(0, dtype=np.int64)}
        columns = {n: np.concatenate([p[n] for p in parts]) if parts else empty[n] for n in names}
        ids = columns["id"]
        # records come in block order and a block's ids are sorted; the ids
        # of a lower block are lower in every run (workers/fragments.py),
        # but the store does not rely on it
        if np.all(ids[1:] > ids[:-1]):
            return columns
        order = np.argsort(ids, kind="stable")
        return {n: c[order] for n, c in columns.items()}

    def stream_edges(self, attributes: Iterable[str] = ("merge_score",), chunk: int = EDGE_CHUNK) -> Iterator[Edges]:
        """Every edge with `attributes`, in chunks of about `chunk` edges
        (whole records), in no particular order: for the look-up tables."""
        attributes = list(attributes)
        columns = ["u", "v", *columns_needed(attributes)]
        pending: list[Record] = []
        rows = 0
        with ThreadPoolExecutor(DECODERS) as pool:
            for batch in self._stream("edges", columns):
                for record in batch:
                    pending.append(record)
                    rows += record.meta["rows"]
                    if rows >= chunk:
                        yield edges_of(pending, attributes, sort=False, map=pool.map)
                        pending, rows = [], 0
            if pending:
                yield edges_of(pending, attributes, sort=False, map=pool.map)

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> GraphStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _old_layout(store: str, remedy: str) -> UserError:
    return UserError(f"store: {store} holds a region graph of an older affseg (a row per node and edge); {remedy}")


class SqliteGraphStore(GraphStore):
    """The embedded default: one file, safe for several local worker processes
    (WAL journal, writers wait for the lock instead of failing). A record is
    a row: its block, part, `meta` (JSON) and one BLOB of its columns'
    bytes in `meta`'s order."""

    TABLES = {"nodes": "node_records", "edges": "edge_records"}

    def __init__(self, path: Path):
        self.path = path
        self.name = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(path, timeout=600, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            layout = self.db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise UserError(f"store: {path} is not a usable SQLite database ({e}); delete the run directory to start again") from e
        remedy = f"delete {path.name} and run again: the run then redoes its fragments and agglomerate steps"
        if {"nodes", "edges"} & tables:
            self.db.close()
            raise _old_layout(str(path), remedy)
        if layout not in (0, LAYOUT):
            self.db.close()
            raise UserError(f"store: {path} holds a region graph of layout {layout}, this affseg reads {LAYOUT}; {remedy}")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(
            "".join(
                f"CREATE TABLE IF NOT EXISTS {table} (block INTEGER, part INTEGER, meta TEXT, data BLOB, "
                f"PRIMARY KEY (block, part));"
                for table in self.TABLES.values()
            )
            + "CREATE TABLE IF NOT EXISTS owner (one INTEGER PRIMARY KEY CHECK (one = 1), record TEXT);"
            + f"PRAGMA user_version = {LAYOUT};"
        )

    def reset(self) -> None:
        for table in self.TABLES.values():
            self.db.execute(f"DELETE FROM {table}")

    def _recorded_owner(self) -> dict | None:
        row = self.db.execute("SELECT record FROM owner").fetchone()
        return None if row is None else json.loads(row[0])

    def _record_owner(self, owner: RunOwner) -> None:
        self.db.execute("INSERT OR IGNORE INTO owner VALUES (1, ?)", (json.dumps(owner.to_json()),))

    def _holds_graph(self) -> bool:
        return any(self.db.execute(f"SELECT EXISTS (SELECT 1 FROM {t})").fetchone()[0] for t in self.TABLES.values())

    def _replace(self, kind: str, block: int, records: list[Record]) -> None:
        table = self.TABLES[kind]
        # encoded before the lock is taken: other writers wait only for the
        # inserts of a few BLOBs
        rows = [(r.block, r.part, r.meta_json(), b"".join(r.columns[c["name"]] for c in r.meta["columns"]))
                for r in records]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(f"DELETE FROM {table} WHERE block = ?", (block,))
            self.db.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?)", rows)
            self.db.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself on some errors ("database or disk
            # is full"); a second ROLLBACK would fail and hide that cause
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    @staticmethod
    def _record(row: tuple, columns: list[str]) -> Record:
        block, part, meta, data = row
        meta = json.loads(meta)
        data = memoryview(data)  # columns are slices of the row's BLOB, not copies
        parts, at = {}, 0
        for spec in meta["columns"]:
            if spec["name"] in columns:
                parts[spec["name"]] = data[at : at + spec["bytes"]]
            at += spec["bytes"]
        return Record(block, part, meta, parts)

    def _read(self, kind: str, blocks: list[int], columns: list[str]) -> list[Record]:
        records: list[Record] = []
        for start in range(0, len(blocks), 900):  # SQLite's host-parameter limit
            chunk = blocks[start : start + 900]
            query = f"SELECT block, part, meta, data FROM {self.TABLES[kind]} WHERE block IN ({','.join('?' * len(chunk))})"
            records += [self._record(row, columns) for row in self.db.execute(query, chunk)]
        return sorted(records, key=lambda r: (r.block, r.part))

    def _stream(self, kind: str, columns: list[str]) -> Iterator[list[Record]]:
        cursor = self.db.execute(f"SELECT block, part, meta, data FROM {self.TABLES[kind]} ORDER BY block, part")
        while rows := cursor.fetchmany(ROWS):
            yield [self._record(row, columns) for row in rows]

    def close(self) -> None:
        self.db.close()


class MongoGraphStore(GraphStore):
    """For clusters where many workers write at once. One client per worker
    process (the store is opened once in a worker's set-up), a document
    per record (block, part, meta and a binary field per column), retries
    with back-off on transient connection errors, StoreLost when they do
    not pass (see open_store)."""

    RETRIES = 5
    COLLECTIONS = {"nodes": "node_records", "edges": "edge_records"}

    def __init__(self, uri: str, default_database: str, secret: str | None = None, timeout_s: float = STORE_TIMEOUT_S,
                 first_contact_s: float | None = None):
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
            if first_contact_s is None:
                # a server the run reached before: ride out a restart as every request does
                self._retry(lambda: self.client.admin.command("ping"))
            else:
                with pymongo.timeout(min(first_contact_s, timeout_s)):
                    self.client.admin.command("ping")
        except StoreLost:
            self.client.close()
            raise
        except PyMongoError as e:
            self.client.close()
            refused = isinstance(e, pymongo.errors.OperationFailure) and e.code == 18
            if not refused and first_contact_s is None:
                raise self._lost(e) from e
            reason = "authentication failed" if refused else type(e).__name__
            raise UserError(f"store: cannot reach MongoDB at {self.uri}: {reason}") from e
        self.db = self.client[name]
        self.name = f"MongoDB database {name!r}"
        self.records = {kind: self.db[collection] for kind, collection in self.COLLECTIONS.items()}
        self.owner = self.db["owner"]
        remedy = "drop that database (or name another in the store URI) and run again: the run then redoes its graph steps"
        if {"nodes", "edges"} & set(self._retry(self.db.list_collection_names)):
            self.client.close()
            raise _old_layout(self.name, remedy)
        recorded = self._retry(lambda: self.owner.find_one({"_id": "layout"}))
        if recorded is None:
            self._retry(lambda: self.owner.update_one({"_id": "layout"}, {"$setOnInsert": {"version": LAYOUT}}, upsert=True))
        elif recorded["version"] != LAYOUT:
            self.client.close()
            raise UserError(f"store: {self.name} holds a region graph of layout {recorded['version']}, "
                            f"this affseg reads {LAYOUT}; {remedy}")
        for collection in self.records.values():
            self._retry(lambda: collection.create_index([("block", 1), ("part", 1)], unique=True))

    def _lost(self, error: Exception) -> StoreLost:
        return StoreLost(f"store: MongoDB at {self.uri} stopped answering ({type(error).__name__})")

    def _retry(self, operation):
        from pymongo.errors import AutoReconnect  # NetworkTimeout and ServerSelectionTimeoutError are kinds of it

        for attempt in range(self.RETRIES):
            try:
                return operation()
            except AutoReconnect as e:
                if attempt == self.RETRIES - 1:
                    raise self._lost(e) from e
                time.sleep(0.5 * 2**attempt)

    def reset(self) -> None:
        for collection in self.records.values():
            self._retry(lambda: collection.delete_many({}))

    def _recorded_owner(self) -> dict | None:
        return self._retry(lambda: self.owner.find_one({"_id": "owner"}, {"_id": 0}))

    def _record_owner(self, owner: RunOwner) -> None:
        from pymongo.errors import DuplicateKeyError

        try:
            self._retry(lambda: self.owner.insert_one({"_id": "owner", **owner.to_json()}))
        except DuplicateKeyError:
            pass

    def _holds_graph(self) -> bool:
        return any(self._retry(lambda: c.find_one({}, {"_id": 1})) is not None for c in self.records.values())

    def _replace(self, kind: str, block: int, records: list[Record]) -> None:
        from bson import Binary

        collection = self.records[kind]
        documents = [{"block": r.block, "part": r.part, "meta": r.meta_json(),
                      "columns": {name: Binary(data) for name, data in r.columns.items()}} for r in records]

        # delete and insert retry as a pair: a retried insert may otherwise
        # meet half of its own earlier attempt
        def replace():
            collection.delete_many({"block": block})
            if documents:
                collection.insert_many(documents, ordered=False)

        self._retry(replace)

    @staticmethod
    def _projection(columns: list[str]) -> dict:
        return {"_id": 0, "block": 1, "part": 1, "meta": 1, **{f"columns.{c}": 1 for c in columns}}

    @staticmethod
    def _record(document: dict) -> Record:
        # bson's Binary is bytes already: no copy of the columns
        return Record(document["block"], document["part"], json.loads(document["meta"]), document["columns"])

    def _read(self, kind: str, blocks: list[int], columns: list[str]) -> list[Record]:
        records: list[Record] = []
        for start in range(0, len(blocks), IN_CHUNK):
            chunk = blocks[start : start + IN_CHUNK]
            documents = self._retry(lambda: list(self.records[kind].find({"block": {"$in": chunk}}, self._projection(columns))))
            records += map(self._record, documents)
        return sorted(records, key=lambda r: (r.block, r.part))

    def _block_ranges(self, collection) -> Iterator[tuple[int, int]]:
        """[first, end) ranges of BLOCK_RANGE block indices up to the last
        block that holds a record in `collection`."""
        last = self._retry(lambda: collection.find_one({}, {"block": 1}, sort=[("block", -1)]))
        if last is None:
            return
        for first in range(0, last["block"] + 1, BLOCK_RANGE):
            yield first, first + BLOCK_RANGE

    def _read_range(self, collection, first: int, end: int, projection: dict) -> list[Record]:
        # one range is one retried request: a failure mid-stream re-reads
        # that range only, never the whole graph
        query = {"block": {"$gte": first, "$lt": end}}
        documents = self._retry(lambda: list(collection.find(query, projection, sort=[("block", 1), ("part", 1)])))
        return [self._record(d) for d in documents]

    def _stream(self, kind: str, columns: list[str]) -> Iterator[list[Record]]:
        """Each range's records (`_read_range`), in range order, with
        READERS requests in flight: the server answers the next ranges
        while this process decodes one."""
        collection, projection = self.records[kind], self._projection(columns)
        with ThreadPoolExecutor(READERS) as pool:
            pending: deque = deque()
            for first, end in self._block_ranges(collection):
                pending.append(pool.submit(self._read_range, collection, first, end, projection))
                if len(pending) == READERS:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def close(self) -> None:
        self.client.close()

def default_database(run_dir: Path, run_id: str) -> str:
    """A database name that no other run can have (the run's id) and that
    a person can still recognise (the run directory's name, cut down to
    the characters MongoDB allows)."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", run_dir.name).strip("_")[:24]
    return f"affseg_{readable}_{run_id[:16]}" if readable else f"affseg_{run_id[:16]}"


def open_store(store: str, run_dir: Path, run_id: str, password_file: str | None = None,
               timeout_s: float = STORE_TIMEOUT_S, first_contact_s: float | None = None) -> GraphStore:
    """`store` is a RunConfig.store value: 'sqlite' or a MongoDB URI; a URI
    without a database gets the run's own (`default_database`). A password
    not in the URI comes from the environment or `password_file`
    (pipeline/storage/credentials.py).

    `first_contact_s` is for a run's first contact (the master's start):
    the wait for the server's first answer, and a server that does not
    answer is the user's to fix (UserError: a wrong host or port). Without
    it the run reached the server before, and one that does not answer
    within `timeout_s` is an outage (StoreLost: the run fails and its
    re-run resumes)."""
    if store == "sqlite":
        return SqliteGraphStore(run_dir / "graph.sqlite")
    secret = password(Path(password_file) if password_file else None)
    return MongoGraphStore(store, default_database=default_database(run_dir, run_id), secret=secret, timeout_s=timeout_s,
                           first_contact_s=first_contact_s)
