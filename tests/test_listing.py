"""The pending listing that feeds Ray Data (ragseg.pipelines.listing): the file round-trips piece by
piece, the read-task plan covers every piece once, and Ray's read tasks give back exactly the rows."""

import pyarrow as pa
import pytest

from ragseg import io
from ragseg.pipelines import listing
from ragseg.sources import row_schema


def _rows(n: int) -> pa.Table:
    cols = {c: [f"{c}-{i}" if c != "labels" else [f"l{i % 3}"] for i in range(n)] for c in row_schema().names}
    return pa.Table.from_pydict(cols, schema=row_schema())


@pytest.mark.parametrize("n,per_piece", [(1, 4), (10, 4), (12, 4), (64, 64)])
def test_listing_round_trip_piece_by_piece(tmp_path, n, per_piece):
    rows = _rows(n)
    uri, offsets, schema = listing.write_listing(str(tmp_path), rows, per_piece)
    assert uri.startswith(listing.listing_dir(str(tmp_path))) and io.exists(uri)
    assert len(offsets) == -(-n // per_piece) + 1 and offsets[0] == 0
    assert schema.names == [*row_schema().names, "error"]
    pieces = list(listing.read_pieces(uri, tuple(int(x) for x in offsets)))
    assert [p.num_rows for p in pieces] == [min(per_piece, n - i) for i in range(0, n, per_piece)]
    back = pa.concat_tables(pieces)
    assert back.drop_columns(["error"]).equals(rows)
    assert set(back.column("error").to_pylist()) == {""}
    # a read task's range in the middle of the file
    if len(offsets) > 3:  # pieces 1 and 2
        mid = list(listing.read_pieces(uri, tuple(int(x) for x in offsets[1:4])))
        assert pa.concat_tables(mid).equals(back.slice(per_piece, 2 * per_piece))
    listing.clear_listings(str(tmp_path))
    assert not io.exists(listing.listing_dir(str(tmp_path)))


@pytest.mark.parametrize("pieces,per,max_tasks,min_tasks", [
    (1, 4, 4000, 4), (10, 4, 4000, 1), (10, 4, 4000, 8), (100_000, 4, 4000, 8), (7, 3, 2, 1), (5, 1, 4000, 64),
])
def test_read_task_plan_covers_every_piece_once(pieces, per, max_tasks, min_tasks):
    plan = listing.read_task_plan(pieces, per, max_tasks, min_tasks)
    assert plan[0][0] == 0 and plan[-1][1] == pieces
    assert all(a < b for a, b in plan) and all(b == a2 for (_, b), (a2, _) in zip(plan, plan[1:]))
    assert len(plan) <= max(max_tasks, 1)
    if pieces >= min_tasks:  # a small job still spreads over the cluster
        assert len(plan) >= min(min_tasks, -(-pieces // per))


def test_read_tasks_give_back_the_rows(tmp_path, ray_local):
    rows = _rows(70)
    uri, offsets, schema = listing.write_listing(str(tmp_path), rows, 8)
    plan = listing.read_task_plan(len(offsets) - 1, 2, 4000, 1)
    src = listing.make_datasource(uri, offsets, schema, rows.num_rows, 8, plan)
    ds = ray_local.data.read_datasource(src, override_num_blocks=len(plan))
    got = sorted(ds.iter_rows(), key=lambda r: int(r["image_id"].split("-")[1]))
    assert [r["image_id"] for r in got] == rows.column("image_id").to_pylist()
    assert got[5]["labels"] == ["l2"] and got[5]["error"] == ""
