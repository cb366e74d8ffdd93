"""Listing a job's source a batch of pages at a time (ragseg.sources.folder.iter_tables), filtering
each batch against the committed image ids (ragseg.idset.IdSet) and writing the pending rows to the
listing file as they come (ragseg.pipelines.common.pending_source): the same images and the same
duplicate-id errors as the whole-listing path, locally and on S3 (moto), with the driver never
holding the whole listing."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from ragseg import idset, ledger
from ragseg.config import SourceConfig
from ragseg.pipelines import listing
from ragseg.pipelines.common import pending_source
from ragseg.sources import folder, list_table

# duplicate ids (a.jpg / a.png, b.jpeg / b.webp) with keys listed between the two files of an id
# (a.b.jpg < a.jpg < a.k.jpg < a.png), a folder and files that share a name prefix, non-images
NAMES = ["a.b.jpg", "a.jpg", "a.k.jpg", "a.png", "a-b.jpg", "a/x.jpg", "a.b/c.jpg", "b.jpeg", "b.webp",
         "c.txt", "d0/im1.jpg", "d0/im1.PNG", "d0/im2.jpg", "zz.webp", "é.jpg"] + [f"m/i{i:03d}.jpg" for i in range(40)]


def _make(root, names):
    for n in names:
        p = os.path.join(root, n)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "wb").close()


def _rows(tables) -> list[tuple]:
    t = pa.concat_tables(tables) if tables else None
    return sorted(zip(t.column("image_id").to_pylist(), t.column("uri").to_pylist(),
                      t.column("file_name").to_pylist())) if t is not None else []


def test_idset_is_exact():
    rng = np.random.default_rng(0)
    ids = [f"img/{rng.integers(1e9)}" for _ in range(5000)] + ["", "é/ü", "a" * 300]
    s = idset.IdSet(pa.array(ids).slice(0))
    queries = ids[::7] + [f"other/{i}" for i in range(500)] + ["", "a" * 299]
    got = s.contains(pa.array(queries).slice(1))
    assert got.tolist() == [q in set(ids) for q in queries[1:]]
    assert len(np.unique(idset.hash64(pa.array(ids)))) == len(set(ids))


def test_idset_is_exact_when_hashes_collide(monkeypatch):
    """A hit on the hash is confirmed on the string: even a hash that collides all the time (the
    string's length) gives exact answers."""
    import pyarrow.compute as pc

    monkeypatch.setattr(idset, "hash64", lambda a: np.asarray(pc.binary_length(idset._strings(a)), np.uint64))
    ids = ["ab", "cd", "ef", "xyz", "q"]
    s = idset.IdSet(pa.array(ids))
    queries = ["cd", "zz", "ef", "xyz", "abc", "q", "r"]
    assert s.contains(pa.array(queries)).tolist() == [q in ids for q in queries]


def test_local_walk_is_in_key_order(tmp_path):
    _make(str(tmp_path), NAMES)
    got = list(folder._sorted_files(str(tmp_path)))
    assert got == sorted(got) and len(got) == len(NAMES)


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 5, 1000])
def test_streamed_listing_matches_the_whole_listing_local(tmp_path, monkeypatch, batch_rows):
    monkeypatch.setattr(folder, "LOCAL_PAGE", 2)
    _make(str(tmp_path / "imgs"), NAMES)
    cfg = SourceConfig(kind="folder", uri=str(tmp_path / "imgs"))
    e1, e2 = [], []
    whole = list_table(cfg, e1)
    tables = list(folder.iter_tables(cfg, e2, batch_rows=batch_rows))
    assert _rows(tables) == _rows([whole])
    assert sorted(map(str, e1)) == sorted(map(str, e2)) and len(e1) == 3  # a.png, b.webp, d0/im1.PNG


def test_streamed_listing_matches_the_whole_listing_s3(s3_server):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("streamed")
    fs.pipe({f"streamed/imgs/{n}": b"" for n in NAMES})
    cfg = SourceConfig(kind="folder", uri="s3://streamed/imgs")
    e1, e2 = [], []
    whole = list_table(cfg, e1)
    for batch_rows in (1, 4, 1000):
        e2 = []
        assert _rows(list(folder.iter_tables(cfg, e2, batch_rows=batch_rows))) == _rows([whole])
        assert sorted(map(str, e1)) == sorted(map(str, e2))


def _committed(out: str, done: list[str]):
    """A label folder whose committed pieces cover ``done`` (4 images a piece): (its ledger, compactor)."""
    header = ledger.new_header("labels")
    ledger.write_header(out, header)
    comp = ledger.Compactor(out, header, every=2, seconds=1e9)
    for k in range(0, len(done), 4):
        comp.add(ledger.new_record(ledger.piece_name(done[k:k + 4]), done[k:k + 4], images=4, segments=0,
                                   errors=0, empty_images=0, data_path="x", errors_path=None, parts_path=None,
                                   stage_seconds={}))
    comp.flush()
    return ledger.load(out, "labels"), comp


def test_pending_source_writes_only_the_pending_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "BATCH_ROWS", 4)
    _make(str(tmp_path / "imgs"), NAMES)
    out = str(tmp_path / "out")
    cfg = SourceConfig(kind="folder", uri=str(tmp_path / "imgs"))
    whole = list_table(cfg)
    ids = whole.column("image_id").to_pylist()
    done = ids[::3]
    led, comp = _committed(out, done)
    errs = []
    pending, listed = pending_source(out, cfg, led, 5, errs)
    assert isinstance(pending, listing.Listing) and listed == len(ids) and len(errs) == 3
    back = pa.concat_tables(list(pending.iter_pieces()))
    assert sorted(back.column("image_id").to_pylist()) == sorted(set(ids) - set(done))
    assert pending.num_rows == back.num_rows and all(p.num_rows <= 5 for p in pending.iter_pieces())
    assert pending.uri.startswith(listing.listing_dir(out))
    # limit / shard pick rows by rank in the whole sorted listing: that path is kept
    table, listed = pending_source(out, SourceConfig(kind="folder", uri=str(tmp_path / "imgs"), limit=10), led, 5, [])
    assert isinstance(table, pa.Table) and listed == 10
    # nothing pending: no listing file
    everything = ledger.new_record("p-all", ids, images=len(ids), segments=0, errors=0, empty_images=0,
                                   data_path="x", errors_path=None, parts_path=None, stage_seconds={})
    comp.add(everything)
    comp.flush()
    listing.clear_listings(out)
    pending, _ = pending_source(out, cfg, ledger.load(out, "labels"), 5, [])
    assert pending.num_rows == 0 and pending.uri is None and not os.path.exists(listing.listing_dir(out))


def test_jobs_on_ray_list_in_a_task_with_the_same_rows_errors_and_one_line_failures(tmp_path, ray_local):
    """With ``ray_cfg`` (the jobs on Ray) the listing runs as a Ray task (ragseg.pipelines.pending): the
    same pending rows and duplicate-id errors as listed here, and an empty folder is the same UserError."""
    from ragseg.config import RayConfig
    from ragseg.errors import UserError

    _make(str(tmp_path / "imgs"), NAMES)
    out = str(tmp_path / "out")
    cfg = SourceConfig(kind="folder", uri=str(tmp_path / "imgs"))
    ids = list_table(cfg).column("image_id").to_pylist()
    led, _ = _committed(out, ids[::3])
    e_here, e_task = [], []
    here, n_here = pending_source(out, cfg, led, 5, e_here)
    task, n_task = pending_source(out, cfg, led, 5, e_task, ray_cfg=RayConfig())
    assert n_task == n_here == len(ids) and len(e_task) == 3 and sorted(map(str, e_task)) == sorted(map(str, e_here))
    assert task.uri != here.uri and task.cpu_s is not None
    assert pa.concat_tables(list(task.iter_pieces())).equals(pa.concat_tables(list(here.iter_pieces())))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="no images"):
        pending_source(out, SourceConfig(kind="folder", uri=str(tmp_path / "empty")), led, 5, [], ray_cfg=RayConfig())


def test_s3_page_parser_reads_url_encoded_keys_and_the_token():
    """A ListObjectsV2 response as S3 writes it with EncodingType=url (AWS S3 API reference,
    ListObjectsV2: Key URL-encoded, NextContinuationToken XML text)."""
    from ragseg.sources.s3list import parse_page

    body = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            b"<Name>b</Name><Prefix>imgs%2F</Prefix><KeyCount>3</KeyCount><MaxKeys>1000</MaxKeys>"
            b"<EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>"
            b"<Contents><Key>imgs/a+b.jpg</Key><Size>0</Size></Contents>"
            b"<Contents><Key>imgs/c%2Bd%C3%A9.jpg</Key><Size>0</Size></Contents>"
            b"<Contents><Key>imgs/x%26y%3C.png</Key><Size>0</Size></Contents>"
            b"<NextContinuationToken>1ue+Gd&amp;x==</NextContinuationToken></ListBucketResult>")
    keys, token = parse_page(body)
    assert keys == ["imgs/a b.jpg", "imgs/c+dé.jpg", "imgs/x&y<.png"] and token == "1ue+Gd&x=="
    assert parse_page(body.replace(b"<IsTruncated>true", b"<IsTruncated>false"))[1] is None


def test_s3_listing_falls_back_to_botocore(s3_server, monkeypatch):
    import fsspec

    from ragseg.sources import s3list

    fs = fsspec.filesystem("s3")
    fs.mkdir("fallback")
    fs.pipe({f"fallback/k/{i:04d} x+.jpg": b"" for i in range(1003)})
    fast = [k for page in s3list.iter_key_pages(fs, "fallback", "k/") for k in page]
    monkeypatch.setattr(s3list, "RETRIES", 1)

    class Broken:
        def __init__(self, *a, **k):
            raise __import__("aiohttp").ClientError("no presigned requests here")

    monkeypatch.setattr(__import__("aiohttp"), "ClientSession", Broken)
    slow = [k for page in s3list.iter_key_pages(fs, "fallback", "k/") for k in page]
    assert fast == slow == sorted(f"k/{i:04d} x+.jpg" for i in range(1003))
