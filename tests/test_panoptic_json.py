"""The label output's panoptic JSON (ragseg.labels_out), on folders written as the label job's piece
writer writes them (the layout of docs/interfaces.md "Label output": ``parts/<piece>.jsonl`` lines
and commit records): one streamed ``panoptic.json``, the split JSON of a large output
(``panoptic_json/panoptic-<n>.json`` + ``index.json``) written incrementally run after run, and one
file made from the parts on request."""

from __future__ import annotations

import json
import os

from ragseg import io, labels_out, ledger

CATS = [{"id": 1, "name": "wall", "isthing": 0}, {"id": 7, "name": "person", "isthing": 1}]


def _piece(out: str, comp: ledger.Compactor, ids: list[str]) -> None:
    """One committed piece as WriteLabelPiece leaves it: its part (one JSON line per image, sorted by
    image id) and its commit record."""
    name = ledger.piece_name(ids)
    paths = labels_out.piece_paths(name)
    lines = [json.dumps({"image_id": i, "id": i, "png_name": f"{i}.png", "file_name": f"{i}.jpg",
                         "uri": f"/imgs/{i}.jpg", "height": 4, "width": 6,
                         "segments_info": [{"id": 1, "category_id": 7, "area": 3, "bbox": [0, 0, 2, 2],
                                            "iscrowd": 0, "score": 0.9}]}, sort_keys=True) for i in sorted(ids)]
    io.write_text_atomic(io.join(out, paths["parts"]), "".join(x + "\n" for x in lines))
    rec = ledger.new_record(name, sorted(ids), images=len(ids), segments=len(ids), errors=0, empty_images=0,
                            data_path=paths["segments"], errors_path=None, parts_path=paths["parts"],
                            stage_seconds={})
    ledger.write_commit(out, rec)
    comp.add(rec)


def _run(out: str, header: dict, first: int, pieces: int, per: int = 8) -> None:
    comp = ledger.Compactor(out, header, every=5, seconds=1e9)
    for p in range(first, first + pieces):
        _piece(out, comp, [f"im{p:04d}-{j}" for j in range(per)])
    comp.flush()
    ledger.write_header(out, header)


def _ids(doc: dict) -> list:
    assert [i["id"] for i in doc["images"]] == [a["image_id"] for a in doc["annotations"]]
    return [i["id"] for i in doc["images"]]


def test_one_streamed_file_below_the_limit(tmp_path):
    out = str(tmp_path / "labels")
    header = ledger.new_header(labels_out.KIND, vocab=CATS)
    ledger.write_header(out, header)
    _run(out, header, 0, 6)
    res = labels_out.maybe_write_panoptic_json(out, header, CATS, "auto", 1000, changed=True,
                                               info={"description": "x", "version": "1"})
    assert res["written"] and res["layout"] == "file"
    doc = json.load(open(os.path.join(out, "panoptic.json")))
    assert doc["info"] == {"description": "x", "version": "1"} and doc["categories"] == CATS
    assert _ids(doc) == sorted(f"im{p:04d}-{j}" for p in range(6) for j in range(8))  # image order
    assert doc["annotations"][0]["file_name"] == "im0000-0.png"
    assert labels_out.maybe_write_panoptic_json(out, header, CATS, "auto", 1000, changed=False)["reason"] == "up to date"


def test_split_json_of_a_large_output_is_written_incrementally(tmp_path):
    out = str(tmp_path / "labels")
    header = ledger.new_header(labels_out.KIND, vocab=CATS)
    ledger.write_header(out, header)
    _run(out, header, 0, 6)  # 48 images: over the limit of 20
    res = labels_out.maybe_write_panoptic_json(out, header, CATS, "auto", 20, changed=True)
    assert res["layout"] == "parts" and res["files"] == 3 and res["written"] == 3
    assert not os.path.exists(os.path.join(out, "panoptic.json"))
    d = os.path.join(out, "panoptic_json")
    idx = json.load(open(os.path.join(d, "index.json")))
    assert [f["file"] for f in idx["files"]] == ["panoptic-000000.json", "panoptic-000001.json", "panoptic-000002.json"]
    assert [f["images"] for f in idx["files"]] == [16, 16, 16] and idx["images"] == 48 and idx["categories"] == CATS
    mtimes = {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)}

    # a second run commits 3 more pieces: the full files stay as they are, the rest goes to new files
    _run(out, header, 6, 3)
    res = labels_out.maybe_write_panoptic_json(out, header, CATS, "auto", 20, changed=True)
    idx = json.load(open(os.path.join(d, "index.json")))
    assert res["written"] == 2 and [f["images"] for f in idx["files"]] == [16, 16, 16, 16, 8]
    for f in ("panoptic-000000.json", "panoptic-000001.json", "panoptic-000002.json"):
        assert os.path.getmtime(os.path.join(d, f)) == mtimes[f]
    # a third run tops up the last file (its piece fits there) and writes no other
    _run(out, header, 9, 1)
    res = labels_out.maybe_write_panoptic_json(out, header, CATS, "auto", 20, changed=True)
    idx = json.load(open(os.path.join(d, "index.json")))
    assert res["written"] == 1 and [f["images"] for f in idx["files"]] == [16, 16, 16, 16, 16]

    every = [i for f in idx["files"] for i in _ids(json.load(open(os.path.join(d, f["file"]))))]
    want = sorted(f"im{p:04d}-{j}" for p in range(10) for j in range(8))
    assert sorted(every) == want  # each image once
    assert sorted(n for f in idx["files"] for n in f["pieces"]) == \
        sorted(ledger.load(out, labels_out.KIND).records.column("name").to_pylist())

    # one file on request, from the parts
    one = labels_out.write_panoptic_json(out, dest=str(tmp_path / "all.json"))
    doc = json.load(open(one))
    assert _ids(doc) == want and doc["categories"] == CATS


def test_a_kill_between_a_split_file_and_its_index(tmp_path, monkeypatch):
    """Files first, index last: after a kill in between, the next run writes the same files again."""
    out = str(tmp_path / "labels")
    header = ledger.new_header(labels_out.KIND, vocab=CATS)
    ledger.write_header(out, header)
    _run(out, header, 0, 5)
    real = io.write_json_atomic

    def killed(uri, obj):
        if uri.endswith("index.json"):
            raise KeyboardInterrupt("killed")
        real(uri, obj)

    monkeypatch.setattr(io, "write_json_atomic", killed)
    try:
        labels_out.maybe_write_panoptic_json(out, header, CATS, "auto", 20, changed=True)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(io, "write_json_atomic", real)
    assert labels_out.read_parts_index(out) is None
    res = labels_out.maybe_write_panoptic_json(out, header, CATS, "auto", 20, changed=False)
    assert res["written"] == 3
    d = os.path.join(out, "panoptic_json")
    assert sorted(os.listdir(d)) == ["index.json", "panoptic-000000.json", "panoptic-000001.json", "panoptic-000002.json"]
    every = [i for f in sorted(os.listdir(d)) if f != "index.json" for i in _ids(json.load(open(os.path.join(d, f))))]
    assert sorted(every) == sorted(f"im{p:04d}-{j}" for p in range(5) for j in range(8))


def test_iter_images_reads_no_image_ids_from_the_ledger(tmp_path):
    out = str(tmp_path / "labels")
    header = ledger.new_header(labels_out.KIND, vocab=CATS)
    ledger.write_header(out, header)
    _run(out, header, 0, 7, per=3)
    led = ledger.load(out, labels_out.KIND, columns=[ledger.FIRST_IMAGE_ID, "parts_path"])
    assert led.records.column_names == ["name", ledger.FIRST_IMAGE_ID, "parts_path"]
    assert sorted(led.records.column(ledger.FIRST_IMAGE_ID).to_pylist()) == [f"im{p:04d}-0" for p in range(7)]
    assert [a["image_id"] for a in labels_out.iter_images(out)] == [f"im{p:04d}-{j}" for p in range(7) for j in range(3)]
