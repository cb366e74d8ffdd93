"""The user's vocabulary: class names, thing/stuff flags, category ids, and label matching.

Forms :func:`load_vocab` takes (:data:`FORMATS` is the one-line summary ``--help`` and errors print):

- inline names: ``"ball,crate,sky:stuff"`` (not an existing file; commas separate classes);
- a text file (``.txt``), one name per line, e.g. ``ball`` / ``sky:stuff`` / ``road|route``;
- a JSON list of names (``["ball", "sky:stuff"]``), of objects ``{"name"[, "isthing"][, "id"]
  [, "synonyms"][, "supercategory"]}``, or a mix; a COCO panoptic categories file (that list, or a
  dict with ``"categories"``); inline JSON (``'["ball", "sky"]'``) works too;
- CSV: ``name[,isthing[,id[,synonyms]]]``. A first row whose first cell is ``name`` is a header and
  then names the columns (``name``, ``isthing``, ``id``, ``synonyms``, ``supercategory``; others are
  ignored); without a header the columns are positional. ``isthing`` accepts 1/0, true/false,
  yes/no, thing/stuff, or nothing. ``synonyms`` are separated by ``|``. Blank lines and lines
  starting with ``#`` are skipped.

Everywhere a name may end in ``:thing`` or ``:stuff`` and carry ``|``-separated synonyms
(``road|route:stuff``). Thing/stuff, when not given, is the flag of the packaged class with that name
or synonym (ADE20k's 150 panoptic classes first, then FC-CLIP's 133 COCO panoptic classes: ``sky`` is
stuff, ``person`` and ``table`` are things; through synonyms, plural-insensitive), else "thing".

Ids are the file's ids when every entry has one, else 1..n in file order (mixing is an error).

Label matching (:meth:`Vocab.index_of`) is case-insensitive, treats ``_`` and ``-`` as spaces,
collapses whitespace, goes through synonyms (a name written as comma-separated synonyms, ADE20k's
``road, route``, is matched by each of them unless another class claims the word), and is plural-insensitive on the last word with the
simple English rules ``-s``, ``-es`` (after s, x, z, ch, sh) and ``-ies -> -y``. An exact (normalised)
name or synonym always wins over a plural/singular match; a plural/singular form shared by two
classes matches neither.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragseg.errors import UserError

_TRUE = {"1", "true", "t", "yes", "y", "thing"}
_FALSE = {"0", "false", "f", "no", "n", "stuff"}
_AMBIGUOUS = -1


def normalize_label(text: str) -> str:
    """Lower case, ``_``/``-`` -> space, collapsed whitespace."""
    return " ".join(re.sub(r"[_\-]+", " ", str(text)).lower().split())


def _singulars(norm: str) -> set[str]:
    """Candidate singular forms of a normalised label (rules applied to its last word)."""
    head, _, last = norm.rpartition(" ")
    prefix = head + " " if head else ""
    out: set[str] = set()
    if len(last) > 3 and last.endswith("ies"):
        out.add(last[:-3] + "y")
    if len(last) > 3 and re.search(r"(s|x|z|ch|sh)es$", last):
        out.add(last[:-2])
    if len(last) > 2 and last.endswith("s") and not last.endswith("ss"):
        out.add(last[:-1])
    return {prefix + w for w in out}


def _add_comma_synonyms(names: list[str], exact: dict[str, int]) -> None:
    """A name given as comma-separated synonyms (ADE20k's ``road, route``) is matched by each of them:
    a word goes to the one class that names it first, else to the one class that names it at all;
    words claimed by several classes, and exact names or synonyms, are left as they are."""
    first: dict[str, set[int]] = {}
    anywhere: dict[str, set[int]] = {}
    for i, n in enumerate(names):
        if "," not in n:
            continue
        parts = [normalize_label(p) for p in n.split(",")]
        parts = [p for p in parts if p]
        for k, key in enumerate(parts):
            anywhere.setdefault(key, set()).add(i)
            if k == 0:
                first.setdefault(key, set()).add(i)
    for key, owners in anywhere.items():
        if key in exact:
            continue
        lead = first.get(key, set())
        if len(lead) == 1:
            exact[key] = next(iter(lead))
        elif not lead and len(owners) == 1:
            exact[key] = next(iter(owners))


def parse_isthing(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError(f"isthing must be 1/0, true/false or thing/stuff, got {value!r}")


@dataclass
class Vocab:
    """Class names with thing/stuff flags and category ids; index = position in ``names``."""

    names: list[str]
    isthing: np.ndarray  # (C,) bool
    ids: list[int]
    synonyms: dict[str, list[str]] = field(default_factory=dict)  # canonical name -> aliases
    supercategories: list[str] | None = None
    source: str = "<memory>"

    def __post_init__(self) -> None:
        self.names = [str(n).strip() for n in self.names]
        self.isthing = np.asarray(self.isthing, dtype=np.bool_).reshape(-1)
        self.ids = [int(i) for i in self.ids]
        where = self.source
        if not self.names:
            raise UserError(f"vocabulary {where} is empty")
        if len(self.isthing) != len(self.names) or len(self.ids) != len(self.names):
            raise UserError(f"vocabulary {where}: names, isthing and ids differ in length")
        seen: dict[str, str] = {}
        for n in self.names:
            if not n:
                raise UserError(f"vocabulary {where}: empty class name")
            key = normalize_label(n)
            if key in seen:
                raise UserError(f"vocabulary {where}: duplicate class name {n!r} (same as {seen[key]!r})")
            seen[key] = n
        if len(set(self.ids)) != len(self.ids):
            dup = sorted({i for i in self.ids if self.ids.count(i) > 1})
            raise UserError(f"vocabulary {where}: duplicate category ids {dup}")
        if self.supercategories is not None and len(self.supercategories) != len(self.names):
            raise UserError(f"vocabulary {where}: supercategories differ in length from names")
        self._build_tables()

    # ------------------------------------------------------------------------------------------
    def _build_tables(self) -> None:
        by_name: dict[str, int] = {normalize_label(n): i for i, n in enumerate(self.names)}
        exact = dict(by_name)
        syn_norm: dict[str, list[str]] = {}
        for canon, aliases in (self.synonyms or {}).items():
            i = by_name.get(normalize_label(canon))
            if i is None:
                raise UserError(f"vocabulary {self.source}: synonyms given for unknown class {canon!r}")
            if isinstance(aliases, str):
                aliases = [a for a in aliases.split("|")]
            for a in aliases:
                key = normalize_label(a)
                if not key:
                    continue
                j = exact.get(key)
                if j is not None and j != i:
                    raise UserError(
                        f"vocabulary {self.source}: synonym {a!r} of {self.names[i]!r} is already "
                        f"{'the class' if normalize_label(self.names[j]) == key else 'a synonym of'} "
                        f"{self.names[j]!r}"
                    )
                exact[key] = i
                syn_norm.setdefault(self.names[i], []).append(a)
        # keep the synonyms keyed by canonical name (merged across sources)
        self.synonyms = {k: list(dict.fromkeys(v)) for k, v in syn_norm.items()}
        _add_comma_synonyms(self.names, exact)
        derived: dict[str, int] = {}
        for key, i in exact.items():
            for form in _singulars(key):
                if form in exact:
                    continue
                prev = derived.get(form)
                derived[form] = i if prev is None or prev == i else _AMBIGUOUS
        self._exact = exact
        self._derived = derived
        self._cache: dict[str, int | None] = {}

    def __len__(self) -> int:
        return len(self.names)

    def index_of(self, label: str) -> int | None:
        """Vocabulary index of a label (case/plural-insensitive, through synonyms), None if no class."""
        if label is None:
            return None
        label = str(label)
        if label in self._cache:
            return self._cache[label]
        key = normalize_label(label)
        out: int | None = None
        if key:
            out = self._exact.get(key)
            if out is None:
                for form in sorted(_singulars(key)):
                    if form in self._exact:
                        out = self._exact[form]
                        break
            if out is None:
                hit = self._derived.get(key)
                if hit is None:
                    for form in sorted(_singulars(key)):
                        if form in self._derived:
                            hit = self._derived[form]
                            break
                out = None if hit is None or hit == _AMBIGUOUS else hit
        if len(self._cache) < 100_000:
            self._cache[label] = out
        return out

    def indices_of(self, labels) -> np.ndarray:
        """Vectorised :meth:`index_of` over any array of labels; -1 where a label maps to no class."""
        arr = np.asarray(labels, dtype=object)
        if arr.size == 0:
            return np.zeros(arr.shape, dtype=np.int64)
        uniq, inv = np.unique(arr.astype(str), return_inverse=True)
        table = np.array([(-1 if (j := self.index_of(u)) is None else j) for u in uniq], dtype=np.int64)
        return table[inv].reshape(arr.shape)

    def with_synonyms(self, synonyms: dict[str, list[str]] | None) -> Vocab:
        """A copy with more synonyms (canonical name -> aliases), e.g. ``LabelConfig.synonyms``."""
        merged: dict[str, list[str]] = {k: list(v) for k, v in self.synonyms.items()}
        for k, v in (synonyms or {}).items():
            merged.setdefault(k, []).extend([v] if isinstance(v, str) else list(v))
        return Vocab(list(self.names), self.isthing.copy(), list(self.ids), merged,
                     None if self.supercategories is None else list(self.supercategories), self.source)

    def categories(self) -> list[dict]:
        """COCO panoptic ``categories``: ``{"id", "name", "isthing" (0/1), "supercategory"}``."""
        out = []
        for i, n in enumerate(self.names):
            sup = self.supercategories[i] if self.supercategories else ""
            out.append({"id": self.ids[i], "name": n, "isthing": int(bool(self.isthing[i])),
                        "supercategory": sup or ("thing" if self.isthing[i] else "stuff")})
        return out

    @classmethod
    def from_names(cls, names: list[str], isthing=None, ids=None, synonyms=None) -> Vocab:
        isthing = np.ones(len(names), bool) if isthing is None else isthing
        ids = list(range(1, len(names) + 1)) if ids is None else ids
        return cls(list(names), isthing, ids, dict(synonyms or {}))


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
FORMATS = ('inline names "ball,crate,sky:stuff"; a .txt file with one name per line; a JSON list of names '
           '["ball", "sky:stuff"] or of {"name": "sky", "isthing": false} objects; a CSV file '
           'name[,isthing[,id[,synonyms]]]; or a COCO panoptic categories JSON. A name may end in :thing or '
           ':stuff (default: the packaged ADE20k / COCO flag of that name, else thing) and carry |-separated '
           'synonyms (road|route)')
_FLAG = re.compile(r"^(.*?)\s*:\s*(thing|stuff)\s*$", re.IGNORECASE)


def split_flag(text: str) -> tuple[str, bool | None]:
    """``"sky:stuff"`` -> ("sky", False); ``"ball"`` -> ("ball", None) (no flag given)."""
    m = _FLAG.match(str(text))
    if m is None:
        return str(text).strip(), None
    return m.group(1).strip(), m.group(2).lower() == "thing"


_PACKAGED: list[Vocab] | None = None


def _packaged() -> list[Vocab]:
    """The packaged class lists that give a name's default thing/stuff flag: ADE20k's 150 panoptic
    classes, then FC-CLIP's COCO panoptic classes, with their synonyms (ragseg/data). ADE20k first:
    where they disagree (table, door, window, light, shelf...) COCO's merged stuff classes are the
    odd ones."""
    global _PACKAGED
    if _PACKAGED is None:
        from importlib import resources

        out = []
        data = resources.files("ragseg.data")
        coco = json.loads(data.joinpath("fcclip_coco_panoptic_classes.json").read_text(encoding="utf-8"))
        ade = json.loads(data.joinpath("ade20k_150_categories.json").read_text(encoding="utf-8"))
        for cats in (ade, coco["categories"]):
            names = [c["name"] for c in cats]
            syn: dict[str, list[str]] = {}
            taken = {normalize_label(n) for n in names}
            for c in cats:  # a synonym two classes share (or that names another class) decides nothing
                for a in c.get("synonyms") or []:
                    key = normalize_label(a)
                    if key and key not in taken:
                        syn.setdefault(c["name"], []).append(a)
                        taken.add(key)
            out.append(Vocab(names, [bool(c["isthing"]) for c in cats], list(range(1, len(cats) + 1)), syn,
                             source="<packaged>"))
        _PACKAGED = out
    return _PACKAGED


def default_isthing(name: str) -> bool:
    """Thing/stuff of a class given without a flag: the packaged class it names (ADE20k, then COCO
    panoptic; through synonyms and plurals), else thing."""
    candidates = [name] + [p for p in str(name).split(",") if p.strip()]  # ADE20k's "road, route"
    for v in _packaged():
        for n in candidates:
            i = v.index_of(n)
            if i is not None:
                return bool(v.isthing[i])
    return True


def _split_syn(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [s.strip() for s in value.split("|") if s.strip()]
    if isinstance(value, (list, tuple)):
        return [str(s).strip() for s in value if str(s).strip()]
    raise ValueError(f"synonyms must be a list or a '|'-separated string, got {type(value).__name__}")


def _parse_id(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"id must be an integer, got {value!r}")  # noqa: TRY004 (reported as UserError)
    try:
        f = float(str(value).strip())
    except ValueError:
        raise ValueError(f"id must be an integer, got {value!r}") from None
    if not f.is_integer() or f < 0:
        raise ValueError(f"id must be a non-negative integer, got {value!r}")
    return int(f)


def _name_entry(text: str, at: str, isthing: Any = None, **extra: Any) -> dict:
    """One entry from a name written as ``name[|synonym...][:thing|:stuff]``; an explicit ``isthing``
    (a CSV cell, a JSON field) wins over the suffix; neither: :func:`default_isthing`."""
    name, flag = split_flag(text)
    parts = [p.strip() for p in name.split("|")]
    if not parts[0]:
        raise ValueError(f"empty name in {text!r}")
    if isthing is not None and not (isinstance(isthing, str) and not isthing.strip()):
        flag = parse_isthing(isthing)
    return {"name": parts[0], "isthing": default_isthing(parts[0]) if flag is None else flag,
            "id": extra.get("id"), "synonyms": [p for p in parts[1:] if p] + list(extra.get("synonyms") or []),
            "supercategory": extra.get("supercategory") or "", "where": at}


def _entries_to_vocab(entries: list[dict], where: str, extra_synonyms) -> Vocab:
    names, things, ids, sups = [], [], [], []
    synonyms: dict[str, list[str]] = {}
    have_id = [e["id"] is not None for e in entries]
    if any(have_id) and not all(have_id):
        missing = entries[have_id.index(False)]["where"]
        raise UserError(f"vocabulary {where}: {missing} has no id while other entries do (give all or none)")
    for e in entries:
        names.append(e["name"])
        things.append(e["isthing"])
        sups.append(e.get("supercategory") or "")
        if e["synonyms"]:
            synonyms.setdefault(e["name"], []).extend(e["synonyms"])
    ids = [e["id"] for e in entries] if entries and all(have_id) else list(range(1, len(entries) + 1))
    for k, v in (extra_synonyms or {}).items():
        synonyms.setdefault(k, []).extend([v] if isinstance(v, str) else list(v))
    return Vocab(names, np.array(things, dtype=np.bool_), ids, synonyms,
                 sups if any(sups) else None, where)


_CSV_SHAPE = "name[,isthing[,id[,synonyms]]]"


def _is_flag(cell: str) -> bool:
    return not cell or cell.lower() in _TRUE | _FALSE


def _read_csv(text: str, where: str, lines: bool = False) -> list[dict]:
    """CSV rows ``name[,isthing[,id[,synonyms]]]``. ``lines`` (a .txt file): a line that is not
    CSV-shaped (its second cell is no thing/stuff word, e.g. ADE20k's ``road, route``) is one name."""
    entries = []
    cols = ["name", "isthing", "id", "synonyms"]
    header = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        row = next(csv.reader([raw]), [])
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        at = f"line {lineno}"
        if not entries and not header and cells[0].lower() == "name" and len(cells) > 1:
            cols = [c.lower() for c in cells]
            header = True
            continue
        try:
            if lines and not header and (len(cells) == 1 or not _is_flag(cells[1])):
                entries.append(_name_entry(raw.strip(), at))
                continue
            if len(cells) > len(cols) and not header:
                raise UserError(f"vocabulary {where}: {at}: {len(cells)} columns, expected at most 4 "
                                f"({_CSV_SHAPE}); quote fields that contain commas")
            if not header and len(cells) > 1 and not _is_flag(cells[1]):
                raise ValueError(f"{cells[1]!r} is not a thing/stuff flag; expected {_CSV_SHAPE} (quote a name "
                                 "that contains commas, or use a .txt file with one name per line)")
            rec = dict(zip(cols, cells))
            entries.append(_name_entry(
                rec.get("name", ""), at, rec.get("isthing"),
                id=_parse_id(rec["id"]) if rec.get("id", "") != "" else None,
                synonyms=_split_syn(rec.get("synonyms", "")), supercategory=rec.get("supercategory", "")))
        except ValueError as e:
            raise UserError(f"vocabulary {where}: {at}: {e}") from None
    return entries


_JSON_SHAPE = 'a name ("ball", "sky:stuff") or an object {"name": "sky", "isthing": false}'


def _read_json(data: Any, where: str) -> list[dict]:
    if isinstance(data, dict):
        if "categories" not in data:
            raise UserError(f"vocabulary {where}: a JSON object must have a 'categories' list "
                            '(COCO panoptic), e.g. {"categories": [{"id": 1, "name": "sky", "isthing": 0}]}')
        data = data["categories"]
    if not isinstance(data, list):
        raise UserError(f"vocabulary {where}: expected a JSON list of names or categories, "
                        f'e.g. ["ball", "sky:stuff"], got {type(data).__name__}')
    entries = []
    for k, item in enumerate(data):
        at = f"entry {k}"
        try:
            if isinstance(item, str):
                entries.append(_name_entry(item, at))
                continue
            if not isinstance(item, dict):
                raise ValueError(f"expected {_JSON_SHAPE}, got {type(item).__name__} {item!r}")
            name = str(item.get("name") or "").strip()
            if not name:
                raise ValueError(f"missing or empty 'name'; expected {_JSON_SHAPE}")
            entries.append(_name_entry(
                name, at, item.get("isthing"),
                id=_parse_id(item["id"]) if item.get("id") is not None else None,
                synonyms=_split_syn(item.get("synonyms")), supercategory=str(item.get("supercategory") or "")))
        except ValueError as e:
            raise UserError(f"vocabulary {where}: {at}: {e}") from None
    return entries


def _read_inline(text: str, where: str) -> list[dict]:
    entries = []
    for k, part in enumerate(text.split(",")):
        if not part.strip():
            continue
        try:
            entries.append(_name_entry(part.strip(), f"name {k + 1} ({part.strip()!r})"))
        except ValueError as e:
            raise UserError(f"vocabulary {where}: {e}; expected {FORMATS}") from None
    return entries


def parse_vocab(text: str, where: str = "<text>", synonyms: dict[str, list[str]] | None = None,
                fmt: str | None = None) -> Vocab:
    """Parse vocabulary text; ``fmt`` "csv" | "lines" (a .txt file) | "json" | "inline" | None (JSON
    when it starts with ``[`` or ``{``, else CSV)."""
    if fmt is None:
        fmt = "json" if text.lstrip()[:1] in ("[", "{") else "csv"
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"vocabulary {where} is not valid JSON: {e}") from None
        entries = _read_json(data, where)
    elif fmt == "inline":
        entries = _read_inline(text, where)
    else:
        entries = _read_csv(text, where, lines=fmt == "lines")
    if not entries:
        raise UserError(f"vocabulary {where} is empty; expected {FORMATS}")
    return _entries_to_vocab(entries, where, synonyms)


def is_inline(spec: str) -> bool:
    """True when ``spec`` is a vocabulary written on the command line, not a file: inline JSON, or a
    name list that is not an existing file and does not look like a path (no ``/``, no ``://``, no
    .csv/.json/.txt ending)."""
    s = spec.strip()
    if s[:1] in ("[", "{"):
        return True
    if "://" in s or "/" in s or "\\" in s or s.lower().endswith((".csv", ".json", ".txt")):
        return False
    import os

    return not os.path.exists(os.path.expanduser(s))


def load_vocab(uri: str, synonyms: dict[str, list[str]] | None = None) -> Vocab:
    """Load a vocabulary: inline names (``"ball,crate,sky:stuff"``), inline JSON, or a file at any
    fsspec URI (.txt one name per line, .json, .csv; see :data:`FORMATS`); ``synonyms`` (canonical
    name -> aliases, e.g. ``LabelConfig.synonyms``) are added to the vocabulary's own."""
    from ragseg.io import read_text

    if is_inline(uri):
        s = uri.strip()
        return parse_vocab(s, "given inline", synonyms, "json" if s[:1] in ("[", "{") else "inline")
    try:
        text = read_text(uri)
    except FileNotFoundError:
        raise UserError(f"vocabulary file not found: {uri} (--vocab takes a file or inline names; {FORMATS})") from None
    except IsADirectoryError:
        raise UserError(f"vocabulary {uri} is a folder, not a file ({FORMATS})") from None
    except UnicodeDecodeError:
        raise UserError(f"vocabulary {uri} is not UTF-8 text") from None
    low = uri.lower().split("?", 1)[0]
    fmt = "json" if low.endswith(".json") else "csv" if low.endswith(".csv") else \
        "lines" if low.endswith(".txt") else None
    if fmt is None and text.lstrip()[:1] not in ("[", "{"):
        fmt = "lines"  # no extension: CSV rows or one name per line, told apart per line
    return parse_vocab(text, uri, synonyms, fmt)
