"""One test module, both backends: SQLite and a real MongoDB-wire server."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.storage.graph_store import BLOCK_RANGE, VALID_DATABASE, Edges, Nodes, RunOwner, default_database, open_store


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
    affinities = np.arange(len(pairs) * channels, dtype=np.float32).reshape(-1, channels) / 10
    return Edges(u, v, np.array(scores, dtype=np.float32), affinities)


def test_nodes_round_trip_by_block(store):
    store.write_nodes(0, nodes([1, 2, 3], 0))
    store.write_nodes(1, nodes([101, 102], 1))
    read = store.read_nodes([1])
    assert read.ids.tolist() == [101, 102]
    np.testing.assert_allclose(read.centers, [[10.0, 1.5, 2.5]] * 2)
    assert read.sizes.tolist() == [1, 2]
    assert store.read_nodes([0, 1]).ids.tolist() == [1, 2, 3, 101, 102]
    assert store.node_ids().tolist() == [1, 2, 3, 101, 102]


def test_rewriting_a_block_leaves_no_duplicates(store):
    store.write_nodes(0, nodes([1, 2, 3], 0))
    store.write_edges(0, edges([(1, 2), (2, 3)], [0.1, 0.2]))
    # the block runs again (a retry after a worker died), with other results
    store.write_nodes(0, nodes([1, 2], 0))
    store.write_edges(0, edges([(1, 2)], [0.3]))
    assert store.node_ids().tolist() == [1, 2]
    chunks = list(store.stream_edges())
    u = np.concatenate([c[0] for c in chunks])
    assert u.tolist() == [1]
    assert np.concatenate([c[2] for c in chunks]).tolist() == pytest.approx([0.3])


def test_edges_keep_nan_scores_and_affinities(store):
    store.write_edges(4, edges([(1, 5), (2, 7), (3, 9)], [0.25, np.nan, 0.75]))
    store.write_edges(5, edges([(10, 11)], [0.5]))
    read = store.read_edges([4])
    assert read.u.tolist() == [1, 2, 3] and read.v.tolist() == [5, 7, 9]
    assert read.scores[0] == pytest.approx(0.25) and np.isnan(read.scores[1])
    np.testing.assert_allclose(read.affinities, np.arange(9).reshape(3, 3) / 10, rtol=1e-6)
    streamed = list(store.stream_edges(chunk=2))
    assert [len(c[0]) for c in streamed] == [2, 2]
    assert sorted(np.concatenate([c[1] for c in streamed]).tolist()) == [5, 7, 9, 11]


def test_the_whole_graph_is_read_in_order_across_many_blocks(store):
    """The master reads node ids and edges block range by block range
    (MongoDB: BLOCK_RANGE blocks per request); ids come back sorted and no
    edge is lost between ranges."""
    blocks = [0, BLOCK_RANGE - 1, BLOCK_RANGE, 5 * BLOCK_RANGE + 3]
    for block in reversed(blocks):  # written out of order, as workers do
        store.write_nodes(block, nodes([block * 1000 + 2, block * 1000 + 1], block))
        store.write_edges(block, edges([(block * 1000 + 1, block * 1000 + 2)], [block / 1000]))
    assert store.node_ids().tolist() == sorted(b * 1000 + k for b in blocks for k in (1, 2))
    streamed = list(store.stream_edges())
    assert sorted(np.concatenate([c[0] for c in streamed]).tolist()) == [b * 1000 + 1 for b in blocks]
    np.testing.assert_allclose(sorted(np.concatenate([c[2] for c in streamed])), [b / 1000 for b in blocks], rtol=1e-6)


def test_large_ids_below_2_53_survive(store):
    big = 2**53 - 5
    store.write_nodes(7, nodes([big], 7))
    store.write_edges(7, edges([(big - 1, big)], [0.5]))
    assert store.node_ids().tolist() == [big]
    assert store.read_edges([7]).v.tolist() == [big]
    with pytest.raises(ValueError):
        store.write_nodes(8, nodes([2**53], 8))


def test_reset_empties_the_store(store):
    store.write_nodes(0, nodes([1], 0))
    store.write_edges(0, edges([(1, 2)], [0.1]))
    store.reset()
    assert len(store.node_ids()) == 0
    assert list(store.stream_edges()) == []


def test_unreachable_mongodb_names_the_uri_without_waiting_for_the_request_timeout(tmp_path):
    uri = "mongodb://127.0.0.1:9/affseg"  # port 9 (discard): nothing listens
    started = time.monotonic()
    with pytest.raises(UserError, match="cannot reach MongoDB at mongodb://127.0.0.1:9/affseg"):
        # the master's first contact (FIRST_CONTACT_S), here 1 s, not the 120 s of a request
        open_store(uri, tmp_path, "0" * 32, timeout_s=120, reach_s=1)
    assert time.monotonic() - started < 30


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
            store.write_nodes(0, nodes(range(1, 100_001), 0))
        store.db.execute("PRAGMA max_page_count = 1000000")
        store.write_nodes(0, nodes([1, 2], 0))
        assert store.node_ids().tolist() == [1, 2]


def test_a_frozen_mongodb_server_fails_the_request_instead_of_stalling_it(tmp_path, mongodb_process):
    import signal
    import time

    from pymongo.errors import AutoReconnect

    server = mongodb_process.process
    with open_store(mongodb_process.uri + "frozen", tmp_path, "0" * 32, timeout_s=1) as store:
        store.write_nodes(0, nodes([1], 0))
        server.send_signal(signal.SIGSTOP)
        try:
            started = time.time()
            with pytest.raises(AutoReconnect):  # NetworkTimeout and ServerSelectionTimeoutError are kinds of it
                store.write_nodes(1, nodes([2], 1))
            # five attempts of about a second, with 7.5 s of back-off between them
            assert time.time() - started < 30
        finally:
            server.send_signal(signal.SIGCONT)
        # the server back: the same store works again
        store.write_nodes(1, nodes([2], 1))
        assert store.node_ids().tolist() == [1, 2]
