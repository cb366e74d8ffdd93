"""Vocabulary loading (inline names, text, CSV, JSON list, COCO panoptic categories) and label matching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ragseg.errors import UserError
from ragseg.vocab import Vocab, load_vocab, parse_vocab


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_csv_with_header_ids_and_synonyms(tmp_path):
    uri = _write(tmp_path, "v.csv",
                 "name,isthing,id,synonyms\n"
                 "person,1,5,man|woman|people\n"
                 "traffic light,true,7,\n"
                 "sky,stuff,12,\n"
                 "\n# comment\n"
                 "grass,0,13,lawn\n")
    v = load_vocab(uri)
    assert v.names == ["person", "traffic light", "sky", "grass"]
    assert v.isthing.dtype == np.bool_ and v.isthing.tolist() == [True, True, False, False]
    assert v.ids == [5, 7, 12, 13]
    assert v.index_of("Woman") == 0 and v.index_of("people") == 0 and v.index_of("lawns") == 3
    assert v.categories() == [
        {"id": 5, "name": "person", "isthing": 1, "supercategory": "thing"},
        {"id": 7, "name": "traffic light", "isthing": 1, "supercategory": "thing"},
        {"id": 12, "name": "sky", "isthing": 0, "supercategory": "stuff"},
        {"id": 13, "name": "grass", "isthing": 0, "supercategory": "stuff"},
    ]


def test_csv_positional_default_ids_and_isthing_words(tmp_path):
    uri = _write(tmp_path, "v.csv", "car,thing\nroad,stuff\nbus,YES\nwall,False\n")
    v = load_vocab(uri)
    assert v.ids == [1, 2, 3, 4]
    assert v.isthing.tolist() == [True, False, True, False]


def test_json_list_and_coco_categories(tmp_path):
    uri = _write(tmp_path, "v.json", json.dumps([
        {"name": "cat", "isthing": 1, "synonyms": ["kitty"]},
        {"name": "sky", "isthing": False},
    ]))
    v = load_vocab(uri)
    assert v.names == ["cat", "sky"] and v.ids == [1, 2] and v.isthing.tolist() == [True, False]
    assert v.index_of("kitties") == 0

    coco = {"categories": [
        {"id": 1, "name": "person", "isthing": 1, "supercategory": "person"},
        {"id": 184, "name": "tree-merged", "isthing": 0, "supercategory": "plant"},
    ]}
    v2 = load_vocab(_write(tmp_path, "panoptic_coco_categories.json", json.dumps(coco)))
    assert v2.ids == [1, 184]
    assert v2.index_of("tree merged") == 1 and v2.index_of("Tree_Merged") == 1
    assert v2.categories()[1] == {"id": 184, "name": "tree-merged", "isthing": 0, "supercategory": "plant"}
    # a bare list of COCO categories works too
    v3 = load_vocab(_write(tmp_path, "cats.json", json.dumps(coco["categories"])))
    assert v3.ids == [1, 184]


def test_index_of_plurals_case_separators_and_config_synonyms(tmp_path):
    uri = _write(tmp_path, "v.csv", "name,isthing\ncar,1\nbus,1\nbox,1\nberry,1\nglasses,1\n"
                                    "traffic_light,1\nwine glass,1\n")
    v = load_vocab(uri, synonyms={"car": ["automobile"], "Traffic Light": ["signal"]})
    assert v.index_of("CARS") == 0
    assert v.index_of("buses") == 1
    assert v.index_of("boxes") == 2
    assert v.index_of("berries") == 3
    assert v.index_of("glass") == 4          # singular of a plural class name
    assert v.index_of("glasses") == 4
    assert v.index_of("traffic-lights") == 5 and v.index_of("Traffic Light") == 5
    assert v.index_of("wine glasses") == 6   # plural rule on the last word only
    assert v.index_of("automobiles") == 0 and v.index_of("signal") == 5
    assert v.index_of("zebra") is None and v.index_of("") is None
    assert v.indices_of(np.array([["cars", "zebra"], ["", "bus"]], dtype=object)).tolist() == [[0, -1], [-1, 1]]


def test_exact_name_beats_plural_match():
    v = Vocab.from_names(["glass", "glasses"])
    assert v.index_of("glass") == 0 and v.index_of("Glasses") == 1


@pytest.mark.parametrize("text,needle", [
    ("name,isthing\ncar,1\ndog,maybe\n", "line 3"),
    ("name,isthing,id\ncar,1,x\n", "line 2"),
    ("car,1,1,a|b,extra\n", "line 1"),
    ("name,isthing\n,1\n", "line 2"),
    ("name,isthing\ncar,1\nCAR ,0\n", "duplicate"),
    ("name,isthing\nCar,1\ncar,0\n", "duplicate"),
    ("name,isthing\n", "empty"),
    ("", "empty"),
    ("name,isthing,id\ncar,1,3\ndog,1,3\n", "duplicate category ids"),
    ("name,isthing,id\ncar,1,3\ndog,1,\n", "no id"),
    ("car,1\nroad, route\n", "not a thing/stuff flag"),
])
def test_bad_csv_rows(tmp_path, text, needle):
    uri = _write(tmp_path, "bad.csv", text)
    with pytest.raises(UserError) as e:
        load_vocab(uri)
    assert uri in str(e.value)
    assert needle in str(e.value)


def test_plural_duplicates_are_allowed_but_case_duplicates_not():
    # "car" and "cars" differ after normalisation; only exact duplicates are rejected
    v = parse_vocab("car,1\ncars,1\n", "mem.csv")
    assert v.index_of("car") == 0 and v.index_of("cars") == 1


@pytest.mark.parametrize("data,needle", [
    ([{"isthing": 1}], "entry 0"),
    ([{"name": "cat", "isthing": "sometimes"}], "entry 0"),
    ([{"name": "cat", "isthing": 1}, 5], "entry 1: expected a name"),
    ({"things": []}, "categories"),
    ([], "empty"),
])
def test_bad_json(tmp_path, data, needle):
    uri = _write(tmp_path, "bad.json", json.dumps(data))
    with pytest.raises(UserError) as e:
        load_vocab(uri)
    assert uri in str(e.value) and needle in str(e.value)


def test_missing_file_and_bad_synonyms(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_vocab(str(tmp_path / "nope.csv"))
    uri = _write(tmp_path, "v.csv", "car,1\ndog,1\n")
    with pytest.raises(UserError, match="unknown class 'cat'"):
        load_vocab(uri, synonyms={"cat": ["kitty"]})
    with pytest.raises(UserError, match="already"):
        load_vocab(uri, synonyms={"car": ["dog"]})
    with pytest.raises(UserError, match="already"):
        load_vocab(uri, synonyms={"car": ["pet"], "dog": ["pet"]})


# ----------------------------------------------------------------------------------------------
# the newcomer's forms: inline names, one name per line, a JSON list of names; default flags
# ----------------------------------------------------------------------------------------------
def test_inline_names_with_default_and_explicit_flags():
    v = load_vocab("ball,crate,sky")
    assert v.names == ["ball", "crate", "sky"] and v.ids == [1, 2, 3]
    assert v.isthing.tolist() == [True, True, False]  # sky: the packaged ADE20k / COCO flag
    v = load_vocab(" table , grass:thing, lamp:stuff ,road|route")
    assert v.names == ["table", "grass", "lamp", "road"]
    assert v.isthing.tolist() == [True, True, False, False]
    assert v.index_of("route") == 3 and v.index_of("tables") == 0
    assert load_vocab('["ball", "sky:stuff"]').isthing.tolist() == [True, False]  # inline JSON
    assert load_vocab("sky").names == ["sky"]  # one inline name


def test_default_isthing_from_packaged_lists():
    from ragseg.vocab import default_isthing

    assert [default_isthing(n) for n in ("person", "people", "sky", "wall", "tables", "zebra crossing sign")] == \
        [True, True, False, False, True, True]


def test_text_file_one_name_per_line(tmp_path):
    uri = _write(tmp_path, "v.txt", "# my classes\nball\n\nsky:stuff\nroad, route\ncrate,thing\nperson|pedestrian\n")
    v = load_vocab(uri)
    assert v.names == ["ball", "sky", "road, route", "crate", "person"]
    assert v.isthing.tolist() == [True, False, False, True, True]
    assert v.index_of("route") == 2 and v.index_of("pedestrians") == 4
    # a CSV file may leave isthing out too
    assert load_vocab(_write(tmp_path, "v.csv", "ball\nsky,,\n")).isthing.tolist() == [True, False]


def test_json_list_of_names_and_objects_without_isthing(tmp_path):
    uri = _write(tmp_path, "v.json", json.dumps(["ball", "sky:stuff", {"name": "grass"}, {"name": "rock", "isthing": 1}]))
    v = load_vocab(uri)
    assert v.names == ["ball", "sky", "grass", "rock"] and v.isthing.tolist() == [True, False, False, True]


def test_vocab_errors_name_the_expected_shape(tmp_path):
    with pytest.raises(UserError) as e:
        load_vocab(str(tmp_path / "classes.csv"))
    assert "not found" in str(e.value) and "ball,crate,sky" in str(e.value)
    with pytest.raises(UserError, match="expected a name"):
        load_vocab(_write(tmp_path, "v.json", "[1, 2]"))
    with pytest.raises(UserError, match="inline names"):
        load_vocab(" , ")
