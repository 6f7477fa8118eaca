"""One test module, both backends: SQLite and a real MongoDB-wire server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import StoreLost, UserError
from pipeline.storage.graph_records import EDGE_ATTRIBUTES, Attribute, Edges, Nodes, encode_edges
from pipeline.storage.graph_store import BLOCK_RANGE, VALID_DATABASE, RunOwner, default_database, open_store


@pytest.fixture(params=["sqlite", "mongodb"])
def store(request, tmp_path):
    if request.param == "sqlite":
        spec = "sqlite"
    else:
        uri = request.getfixturevalue("mongodb_uri")
        spec = uri.rstrip("/") + f"/test_{tmp_path.name}"
    with open_store(spec, tmp_path / "run", "0" * 32) as s:
        s.reset()
        yield s


def nodes(ids, block):
    ids = np.array(ids, dtype=np.uint64)
    return Nodes(ids, np.tile([[block * 10.0, 1.5, 2.5]], (len(ids), 1)), np.arange(len(ids), dtype=np.int64) + 1)


def edges(pairs, scores, channels=3):
    u = np.array([p[0] for p in pairs], dtype=np.uint64)
    v = np.array([p[1] for p in pairs], dtype=np.uint64)
    affinities = (np.arange(len(pairs) * channels).reshape(-1, channels) * 10 % 256).astype(np.uint8)
    linked = np.ones_like(affinities, dtype=bool)
    linked[:, -1] = False  # the longest offset links no pair of these
    return Edges(u, v, {"merge_score": np.array(scores, dtype=np.float32), "linked": linked,
                        "affinities": np.where(linked, affinities, 0).astype(np.uint8)})


def streamed(store, attributes=("merge_score",)):
    chunks = list(store.stream_edges(attributes))
    assert all(len(c) for c in chunks)
    return Edges(*(np.concatenate([getattr(c, k) for c in chunks]) if chunks else np.zeros(0, np.uint64) for k in "uv"),
                 {a: np.concatenate([c[a] for c in chunks]) for a in attributes} if chunks else {})


def test_nodes_round_trip_by_block(store):
    store.write_nodes(0, nodes([1, 2, 3], 0))
    store.write_nodes(1, nodes([101, 102], 1))
    read = store.read_nodes([1])
    assert read.ids.tolist() == [101, 102]
    np.testing.assert_allclose(read.centers, [[10.0, 1.5, 2.5]] * 2)
    assert read.sizes.tolist() == [1, 2]
    assert store.read_nodes([0, 1]).ids.tolist() == [1, 2, 3, 101, 102]
    assert store.node_ids().tolist() == [1, 2, 3, 101, 102]
    # blocks written out of order: still sorted by id, sizes with them
    store.write_nodes(2, nodes([7, 9], 2))
    ids, sizes = store.node_sizes()
    assert ids.tolist() == [1, 2, 3, 7, 9, 101, 102] and sizes.tolist() == [1, 2, 3, 1, 2, 1, 2]


def test_rewriting_a_block_leaves_no_duplicates(store):
    store.write_nodes(0, nodes([1, 2, 3], 0))
    store.write_edges(0, edges([(1, 2), (2, 3)], [0.1, 0.2]))
    # the block runs again (a retry after a worker died), with other results
    store.write_nodes(0, nodes([1, 2], 0))
    store.write_edges(0, edges([(1, 2)], [0.3]))
    # and once more with the same ones (a block re-run after a crash)
    store.write_edges(0, edges([(1, 2)], [0.3]))
    assert store.node_ids().tolist() == [1, 2]
    graph = streamed(store)
    assert graph.u.tolist() == [1] and graph.v.tolist() == [2]
    assert graph["merge_score"].tolist() == pytest.approx([0.3])
    # a block that now has nothing leaves nothing behind
    store.write_edges(0, edges([], []))
    assert len(streamed(store)) == 0


def test_edges_keep_every_attribute_bit_for_bit(store):
    written = edges([(3, 9), (1, 5), (2, 7)], [0.25, np.nan, 0.75])  # not in (u, v) order
    store.write_edges(4, written)
    store.write_edges(5, edges([(10, 11)], [0.5]))
    read = store.read_edges([4], ["merge_score", "affinities", "linked"])
    order = [1, 2, 0]  # sorted by (u, v)
    assert read.u.tolist() == [1, 2, 3] and read.v.tolist() == [5, 7, 9]
    for name in ("merge_score", "affinities", "linked"):
        assert read[name].dtype == written[name].dtype
        np.testing.assert_array_equal(read[name], written[name][order])
    assert np.isnan(read["merge_score"][0])
    # the look-up tables ask for the merge score alone
    graph = streamed(store)
    assert sorted(graph.v.tolist()) == [5, 7, 9, 11] and list(graph.attributes) == ["merge_score"]


def test_an_attribute_a_step_declares_is_stored_by_both_backends(store, monkeypatch):
    """A method adds an edge attribute with one declaration, no schema."""
    monkeypatch.setitem(EDGE_ATTRIBUTES, "uncertainty", Attribute(np.float32, "a test's", per_offset=True))
    extra = edges([(1, 2), (1, 3)], [0.1, 0.2])
    extra.attributes["uncertainty"] = np.array([[0.5, 0.25, 0.125], [1, 2, 3]], dtype=np.float32)
    store.write_edges(0, extra)
    np.testing.assert_array_equal(store.read_edges([0], ["uncertainty"])["uncertainty"], extra["uncertainty"])
    np.testing.assert_array_equal(streamed(store, ["uncertainty", "affinities"])["affinities"], extra["affinities"])
    with pytest.raises(KeyError, match="no 'mean_size'"):
        store.read_edges([0], ["mean_size"])
    undeclared = edges([(1, 2)], [0.1])
    undeclared.attributes["mean_size"] = np.ones(1, dtype=np.float32)
    with pytest.raises(ValueError, match="'mean_size' is not declared"):
        store.write_edges(1, undeclared)


def test_the_whole_graph_is_read_in_order_across_many_blocks(store):
    """The master reads node ids and edges block range by block range
    (MongoDB: BLOCK_RANGE blocks per request); ids come back sorted and no
    edge is lost between ranges."""
    blocks = [0, BLOCK_RANGE - 1, BLOCK_RANGE, 5 * BLOCK_RANGE + 3]
    for block in reversed(blocks):  # written out of order, as workers do
        store.write_nodes(block, nodes([block * 1000 + 2, block * 1000 + 1], block))
        store.write_edges(block, edges([(block * 1000 + 1, block * 1000 + 2)], [block / 1000]))
    assert store.node_ids().tolist() == sorted(b * 1000 + k for b in blocks for k in (1, 2))
    graph = streamed(store)
    assert sorted(graph.u.tolist()) == [b * 1000 + 1 for b in blocks]
    np.testing.assert_allclose(sorted(graph["merge_score"]), [b / 1000 for b in blocks], rtol=1e-6)


def test_a_block_over_the_document_limit_is_split_and_reads_back_whole(store):
    """A block whose record would pass MongoDB's 16 MB document limit (here
    random edges that do not compress: some 20 MB) is kept in parts."""
    rng = np.random.default_rng(0)
    count = 1_600_000
    u = np.sort(rng.integers(1, 2**40, count).astype(np.uint64))
    big = Edges(u, u + rng.integers(1, 2**40, count).astype(np.uint64),
                {"merge_score": rng.random(count, dtype=np.float32), "linked": np.ones((count, 1), dtype=bool),
                 "affinities": rng.integers(0, 256, (count, 1)).astype(np.uint8)})
    records = encode_edges(3, big)
    assert len(records) > 1 and sum(len(b) for r in records for b in r.columns.values()) > 16 * 2**20
    store.write_edges(3, big)
    store.write_edges(2, edges([(1, 2)], [0.5]))
    read = store.read_edges([3], ["merge_score", "affinities"])
    for name in ("u", "v"):
        np.testing.assert_array_equal(getattr(read, name), getattr(big, name))
    np.testing.assert_array_equal(read["merge_score"], big["merge_score"])
    np.testing.assert_array_equal(read["affinities"], big["affinities"])
    assert len(streamed(store)) == count + 1
    # replaced by a small record: no part is left behind
    store.write_edges(3, edges([(5, 6)], [0.5]))
    assert sorted(streamed(store).u.tolist()) == [1, 5]


def test_large_ids_below_2_53_survive(store):
    big = 2**53 - 5
    store.write_nodes(7, nodes([big], 7))
    store.write_edges(7, edges([(big - 1, big)], [0.5]))
    assert store.node_ids().tolist() == [big]
    assert store.read_edges([7], []).v.tolist() == [big]
    with pytest.raises(ValueError):
        store.write_nodes(8, nodes([2**53], 8))


def test_reset_empties_the_store(store):
    store.write_nodes(0, nodes([1], 0))
    store.write_edges(0, edges([(1, 2)], [0.1]))
    store.reset()
    assert len(store.node_ids()) == 0
    assert list(store.stream_edges()) == []
    assert store.claim(RunOwner("1" * 32, "/runs/a", "host-a")) is False


def test_unreachable_mongodb_names_the_uri_without_waiting_for_the_request_timeout(tmp_path):
    uri = "mongodb://127.0.0.1:9/affseg"  # port 9 (discard): nothing listens
    started = time.monotonic()
    with pytest.raises(UserError, match="cannot reach MongoDB at mongodb://127.0.0.1:9/affseg"):
        # the master's first contact (FIRST_CONTACT_S), here 1 s, not the 120 s of a request
        open_store(uri, tmp_path, "0" * 32, timeout_s=120, first_contact_s=1)
    assert time.monotonic() - started < 30


def test_a_server_the_run_reached_before_and_that_is_gone_is_an_outage_not_a_bad_config(tmp_path, mongodb_process):
    # the master's first contact says "cannot reach" (exit 2: a wrong URI);
    # any later open, a worker's or the master's segments step, fails the
    # run for a re-run (exit 1) once the server is away longer than timeout_s
    uri = mongodb_process.uri + "gone"
    open_store(uri, tmp_path, "0" * 32, first_contact_s=15).close()
    mongodb_process.kill()
    with pytest.raises(UserError, match="cannot reach MongoDB at"):
        open_store(uri, tmp_path, "0" * 32, timeout_s=120, first_contact_s=1)
    with pytest.raises(StoreLost, match=r"stopped answering \(ServerSelectionTimeoutError\)$") as lost:
        open_store(uri, tmp_path, "0" * 32, timeout_s=1)
    assert not isinstance(lost.value, UserError)
    # a server restarted while a worker opens the store: ridden out by the
    # retries of every request (about 12 s of them at timeout_s 1)
    restart = threading.Timer(2, mongodb_process.start)
    restart.start()
    try:
        open_store(uri, tmp_path, "0" * 32, timeout_s=1).close()
    finally:
        restart.join()


def test_default_database_names_never_collide_and_are_always_valid():
    a, b = "1" * 32, "2" * 32
    assert default_database(Path("a/exp"), a) != default_database(Path("b/exp"), b)
    for folder in ("exp", "my run.v2", "x" * 200, "...", "données"):
        assert VALID_DATABASE.fullmatch(default_database(Path(folder), a)), folder


def test_a_store_belongs_to_one_run(store):
    mine, theirs = RunOwner("1" * 32, "/runs/a", "host-a"), RunOwner("2" * 32, "/runs/b", "host-b")
    assert store.claim(mine) is False  # a new record
    assert store.claim(mine) is True
    store.write_nodes(0, nodes([1, 2], 0))
    with pytest.raises(UserError, match="belongs to the run in /runs/a on host-a, not to /runs/b"):
        store.check_owner(theirs)
    with pytest.raises(UserError, match="belongs to the run in /runs/a"):
        store.claim(theirs)
    assert store.node_ids().tolist() == [1, 2]


def test_a_graph_no_run_has_claimed_is_never_taken_over(store):
    store.write_nodes(0, nodes([1], 0))
    with pytest.raises(UserError, match="holds a graph that no run has claimed"):
        store.claim(RunOwner("1" * 32, "/runs/a", "host-a"))
    assert store.node_ids().tolist() == [1]


@pytest.mark.parametrize("uri, message", [
    ("mongodb://127.0.0.1:99999/affseg", "store: not a valid MongoDB URI"),
    ("mongodb://127.0.0.1:abc/affseg", "store: not a valid MongoDB URI"),
    ("mongodb://127.0.0.1:9/my.db", "store: 'my.db' is not a valid MongoDB database name"),
    ("mongodb://127.0.0.1:9/" + "d" * 64, "is not a valid MongoDB database name"),
])
def test_bad_mongodb_uris_are_one_line_errors(tmp_path, uri, message):
    with pytest.raises(UserError, match=message) as error:
        open_store(uri, tmp_path, "0" * 32)
    assert "\n" not in str(error.value)


def test_a_full_sqlite_database_says_so(tmp_path):
    """SQLite rolls a full transaction back by itself; the store must not
    hide "database or disk is full" behind a failed second ROLLBACK."""
    import sqlite3

    with open_store("sqlite", tmp_path / "run", "0" * 32) as store:
        # SQLite's own ceiling on the file size: a real SQLITE_FULL
        store.db.execute("PRAGMA max_page_count = 20")
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            # random centres: a record that does not compress into 20 pages
            ids = np.arange(1, 100_001, dtype=np.uint64)
            store.write_nodes(0, Nodes(ids, np.random.default_rng(0).random((len(ids), 3)), np.ones(len(ids), np.int64)))
        store.db.execute("PRAGMA max_page_count = 1000000")
        store.write_nodes(0, nodes([1, 2], 0))
        assert store.node_ids().tolist() == [1, 2]


def test_a_frozen_mongodb_server_fails_the_request_instead_of_stalling_it(tmp_path, mongodb_process):
    import time

    with open_store(mongodb_process.uri + "frozen", tmp_path, "0" * 32, timeout_s=1) as store:
        store.write_nodes(0, nodes([1], 0))
        mongodb_process.freeze()
        try:
            started = time.time()
            # an outage the run's re-run gets past, not a bad config
            with pytest.raises(StoreLost, match=r"^store: MongoDB at mongodb://127\.0\.0\.1:\d+/frozen stopped answering "
                                                r"\((NetworkTimeout|AutoReconnect|ServerSelectionTimeoutError)\)$"):
                store.write_nodes(1, nodes([2], 1))
            # five attempts of about a second, with 7.5 s of back-off between them
            assert time.time() - started < 30
        finally:
            mongodb_process.thaw()
        # the server back: the same store works again
        store.write_nodes(1, nodes([2], 1))
        assert store.node_ids().tolist() == [1, 2]


def test_a_store_of_the_old_layout_is_refused_in_one_line(tmp_path, mongodb_uri):
    """Before, a row (SQLite) or a document (MongoDB) per node and edge:
    such a store is refused, saying how to start again, never misread."""
    import sqlite3

    import pymongo

    (tmp_path / "run").mkdir()
    old = sqlite3.connect(tmp_path / "run" / "graph.sqlite")
    old.executescript("CREATE TABLE nodes (id INTEGER PRIMARY KEY, z REAL, y REAL, x REAL, size INTEGER, block INTEGER);"
                      "CREATE TABLE edges (u INTEGER, v INTEGER, merge_score REAL, affinities BLOB, block INTEGER);")
    old.close()
    with pytest.raises(UserError, match="graph.sqlite holds a region graph of an older affseg .* delete graph.sqlite") as error:
        open_store("sqlite", tmp_path / "run", "0" * 32)
    assert "\n" not in str(error.value)

    future = sqlite3.connect(tmp_path / "future.sqlite")
    future.execute("PRAGMA user_version = 9")
    future.close()
    (tmp_path / "other").mkdir()
    (tmp_path / "future.sqlite").rename(tmp_path / "other" / "graph.sqlite")
    with pytest.raises(UserError, match="layout 9, this affseg reads 2"):
        open_store("sqlite", tmp_path / "other", "0" * 32)

    database = f"old_{tmp_path.name}"
    with pymongo.MongoClient(mongodb_uri) as client:
        client[database]["edges"].insert_one({"u": 1, "v": 2, "merge_score": 0.5, "block": 0})
    with pytest.raises(UserError, match=f"'{database}' holds a region graph of an older affseg .* drop that database"):
        open_store(mongodb_uri.rstrip("/") + "/" + database, tmp_path, "0" * 32)


def test_records_decode_to_what_was_encoded_whatever_the_order_and_the_parts(monkeypatch):
    """The codecs (ids as differences, v against runs of u, bits, values
    where linked) on edges with many edges per u, given in random order and
    split into many parts: every column comes back bit for bit, sorted."""
    from pipeline.storage import graph_records

    rng = np.random.default_rng(1)
    pairs = np.unique(rng.integers(1, 2**50, (5000, 2)) // [2**40, 1], axis=0)  # about 5 edges per u
    pairs = pairs[pairs[:, 0] < pairs[:, 1]]
    shuffled = rng.permutation(len(pairs))
    linked = rng.random((len(pairs), 4)) < 0.4
    written = Edges(pairs[shuffled, 0].astype(np.uint64), pairs[shuffled, 1].astype(np.uint64),
                    {"merge_score": rng.random(len(pairs), dtype=np.float32), "linked": linked,
                     "affinities": np.where(linked, rng.integers(0, 256, linked.shape), 0).astype(np.uint8)})
    monkeypatch.setattr(graph_records, "PART_BYTES", 4096)
    records = encode_edges(0, written)
    assert len(records) > 8
    read = graph_records.edges_of(records, ["merge_score", "linked", "affinities"])
    order = np.lexsort((written.v, written.u))
    np.testing.assert_array_equal(read.u, written.u[order])
    np.testing.assert_array_equal(read.v, written.v[order])
    for name in ("merge_score", "linked", "affinities"):
        np.testing.assert_array_equal(read[name], written[name][order])


def test_the_runs_codec_equals_its_numpy_reference():
    from pipeline.kernels.compiled.records import runs_decode, runs_encode

    rng = np.random.default_rng(2)
    u = np.sort(rng.integers(1, 50, 2000)).astype(np.uint64)
    v = u + rng.integers(1, 2**45, len(u)).astype(np.uint64)
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    first = np.r_[True, u[1:] != u[:-1]]
    reference = np.where(first, v - u, v - np.r_[np.uint64(0), v[:-1]])
    coded = np.empty_like(v)
    runs_encode(u, v, coded)
    np.testing.assert_array_equal(coded, reference)
    runs_decode(u, coded, coded)  # in place, as the store decodes
    np.testing.assert_array_equal(coded, v)
