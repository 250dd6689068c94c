"""Real datasets for pruning experiments, all available offline.

* :func:`fashion_mnist` -- Fashion-MNIST (Zalando, MIT licence), 60 000 train and
  10 000 test grey-scale 28x28 images of 10 clothing classes.  Read from the
  Debian package ``dataset-fashion-mnist`` (installed under
  ``/usr/share/datasets/fashion-mnist``, or fetched with ``apt-get download``
  and kept under ``<cache_root>/datasets/fashion-mnist``).
* :func:`digits` -- scikit-learn's bundled 8x8 handwritten digits (1 797
  images, UCI "Optical Recognition of Handwritten Digits"), split
  deterministically and stratified.
* :func:`fortunes_sentences` -- real English sentences and short quotes from
  the Debian package ``fortunes`` (the non-offensive BSD fortune cookie
  collection), for distilling a sentence-embedding model.
* :func:`loader` -- a ``DataLoader`` over ``(images, labels)`` tensors.

Every cache file is written atomically (temporary file in the same folder, then
``os.replace``): an interrupted run never leaves a half-written file behind.
Failures to fetch, read or parse raise :class:`~sparsecc.errors.DatasetError`
naming the package or file.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from sparsecc.errors import DatasetError, InvalidArgumentError
from sparsecc.fetch import extract_deb, fetch_debian_packages
from sparsecc.fileio import atomic_path
from sparsecc.cache import cache_root

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "FASHION_CLASSES",
    "FASHION_MEAN",
    "FASHION_STD",
    "FORTUNE_CATEGORIES",
    "digits",
    "digits_split_indices",
    "fashion_mnist",
    "fortunes_sentences",
    "loader",
    "read_idx",
]

#: Per-pixel mean and standard deviation of the Fashion-MNIST training images (pixels in [0, 1]).
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
#: Fashion-MNIST class names, indexed by label.
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
#: Mean and standard deviation of all 1 797 scikit-learn digits after scaling pixels to [0, 1].
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760

_FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_PACKAGE = "dataset-fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_SIZES = {"train": 60000, "test": 10000}

_FORTUNES_SYSTEM_DIR = Path("/usr/share/games/fortunes")
_FORTUNES_PACKAGE = "fortunes"
#: Category files of the Debian ``fortunes`` package used by :func:`fortunes_sentences`: every
#: category except the pictures (``art``, ``ascii-art``).  The ``.dat`` index files and the
#: ``.u8`` symbolic links are never read.
FORTUNE_CATEGORIES = (
    "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education", "ethnic", "food",
    "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie", "love", "magic", "medicine",
    "men-women", "miscellaneous", "news", "paradoxum", "people", "perl", "pets", "platitudes", "politics",
    "pratchett", "science", "songs-poems", "sports", "startrek", "tao", "translate-me", "wisdom", "work",
    "zippy",
)
# Bump when the cleaning rules or the cached fields change: the cached JSON is keyed by it (v2 adds the labels).
_FORTUNES_RULES_VERSION = 2
_FORTUNES_MIN_CHARS, _FORTUNES_MAX_CHARS = 20, 400
_FORTUNES_MIN_LETTER_FRACTION = 0.6
_FORTUNES_HELDOUT_FRACTION = 0.10

# IDX element types: code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --------------------------------------------------------------------------------------------- helpers


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _atomic_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _extract_deb(deb: Path, dest: Path) -> None:
    """Unpack the data archive of a ``.deb`` into ``dest`` (see :func:`sparsecc.fetch.extract_deb`)."""
    extract_deb(deb, dest, DatasetError)


def _fetch_debian_package(package: str, dest: Path) -> None:
    """``apt-get download <package>`` and unpack it into ``dest`` (see :func:`sparsecc.fetch.fetch_debian_packages`).

    Needs no root: ``apt-get download`` only fetches the ``.deb`` into a temporary folder.
    """
    fetch_debian_packages([package], dest, DatasetError, timeout=600)


# --------------------------------------------------------------------------------------------- IDX


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST container), gzip-compressed or not.

    Layout: two zero bytes, one type code (``0x08`` uint8, ``0x09`` int8,
    ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), one byte
    ``ndim``, then ``ndim`` big-endian uint32 dimension sizes, then the
    big-endian elements in C order.

    Parameters
    ----------
    path : str or os.PathLike
        The file; compressed files are recognised by their gzip magic bytes.

    Returns
    -------
    numpy.ndarray
        Shape ``(d0, ..., d{ndim-1})`` as stored, native byte order.

    Raises
    ------
    DatasetError
        The file cannot be read, is not valid gzip, has a bad magic number, an
        unknown type code, or a size that does not match its header.  The
        message names the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}; "
                           "delete it if it is a corrupt cache file")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX element type 0x{code:02x} (magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(f"{path}: IDX size mismatch, header says shape {shape} of {dtype.str} "
                           f"({expected} bytes) but the file holds {len(raw)} bytes")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


# --------------------------------------------------------------------------------------------- Fashion-MNIST


def _fashion_dir() -> Path:
    """Folder holding the four Fashion-MNIST ``.gz`` files, fetching them into the cache if needed."""
    names = [n for pair in _FASHION_FILES.values() for n in pair]
    if all((_FASHION_SYSTEM_DIR / n).is_file() for n in names):
        return _FASHION_SYSTEM_DIR
    cache = cache_root() / "datasets" / "fashion-mnist"
    if all((cache / n).is_file() for n in names):
        return cache
    with tempfile.TemporaryDirectory(prefix="sparsecc-fashion-") as tmp:
        _fetch_debian_package(_FASHION_PACKAGE, Path(tmp))
        src = Path(tmp) / "usr/share/datasets/fashion-mnist"
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise DatasetError(f"Debian package {_FASHION_PACKAGE} does not contain {missing} "
                               f"under usr/share/datasets/fashion-mnist")
        for n in names:
            _atomic_copy(src / n, cache / n)
    return cache


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images and labels, normalized for training.

    Source: the Debian package ``dataset-fashion-mnist`` (Zalando Research,
    MIT licence).  Read from ``/usr/share/datasets/fashion-mnist`` when the
    package is installed; otherwise it is fetched once with ``apt-get download``
    (about 31 MB, no root needed), unpacked, and its four IDX ``.gz`` files are
    kept in ``<cache_root>/datasets/fashion-mnist`` (``$SPARSECC_CACHE_DIR`` or
    ``~/.cache/sparsecc``).

    Parameters
    ----------
    split : {"train", "test"}
        ``"train"`` (60 000 images) or ``"test"`` (the 10 000 ``t10k`` images).

    Returns
    -------
    images : torch.Tensor
        float32, shape ``(N, 1, 28, 28)`` = (batch, channel, height, width);
        pixel intensity in [0, 1] minus :data:`FASHION_MEAN` (0.2860), divided
        by :data:`FASHION_STD` (0.3530): dimensionless, about zero mean and unit
        standard deviation.
    labels : torch.Tensor
        int64, shape ``(N,)``, class index in 0..9 (see :data:`FASHION_CLASSES`);
        each class has 6 000 train and 1 000 test images.

    Raises
    ------
    ValueError
        ``split`` is not ``"train"`` nor ``"test"``.
    DatasetError
        apt-get is missing or fails, the package lacks the files, or an IDX file
        is corrupt or has unexpected dimensions (the message names the file).
    """
    if split not in _FASHION_FILES:
        raise InvalidArgumentError(f"split must be 'train' or 'test', got {split!r}")
    folder = _fashion_dir()
    img_name, lbl_name = _FASHION_FILES[split]
    images = read_idx(folder / img_name)
    labels = read_idx(folder / lbl_name)
    n = _FASHION_SIZES[split]
    if images.shape != (n, 28, 28) or images.dtype != np.uint8:
        raise DatasetError(f"{folder / img_name}: expected uint8 images of shape {(n, 28, 28)}, "
                           f"got {images.dtype} {images.shape}")
    if labels.shape != (n,) or labels.dtype != np.uint8 or labels.max(initial=0) > 9:
        raise DatasetError(f"{folder / lbl_name}: expected {n} uint8 labels in 0..9, "
                           f"got {labels.dtype} {labels.shape}")
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).sub_(FASHION_MEAN).div_(FASHION_STD)
    return x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------------------------- digits


def digits_split_indices(test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices into scikit-learn's ``load_digits()`` of the stratified train / test split.

    Parameters
    ----------
    test_fraction : float
        Share of the 1 797 images in the test split, in (0, 1).
    seed : int
        Seed of the shuffle; the same seed always gives the same split.

    Returns
    -------
    train_idx, test_idx : numpy.ndarray
        int64, shapes ``(N_train,)`` and ``(N_test,)``, sorted, disjoint, and
        together ``0..1796``; ``N_test = ceil(1797 * test_fraction)``.  Every
        class has (within one image) the same share in both splits.

    Raises
    ------
    ValueError
        ``test_fraction`` is not strictly between 0 and 1.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < float(test_fraction) < 1.0:
        raise InvalidArgumentError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = load_digits().target
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=float(test_fraction), random_state=int(seed), shuffle=True,
                              stratify=y)
    return np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64)


def digits(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits, split and normalized for training.

    Source: ``sklearn.datasets.load_digits`` (bundled with scikit-learn, a copy
    of the UCI "Optical Recognition of Handwritten Digits" test set): 1 797
    images of 8x8 pixels with 17 grey levels (0..16).

    Parameters
    ----------
    split : {"train", "test"}
        Which part of the stratified split (see :func:`digits_split_indices`).
    test_fraction : float
        Share of the images in the test split, in (0, 1); 0.25 gives 1 347
        train and 450 test images.
    seed : int
        Seed of the split; deterministic.

    Returns
    -------
    images : torch.Tensor
        float32, shape ``(N, 1, 8, 8)`` = (batch, channel, height, width): grey
        level / 16 (in [0, 1]) minus :data:`DIGITS_MEAN` (0.3053), divided by
        :data:`DIGITS_STD` (0.3760); dimensionless.
    labels : torch.Tensor
        int64, shape ``(N,)``, the digit 0..9.

    Raises
    ------
    ValueError
        ``split`` is not ``"train"`` nor ``"test"``, or ``test_fraction`` is
        not in (0, 1).
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise InvalidArgumentError(f"split must be 'train' or 'test', got {split!r}")
    tr, te = digits_split_indices(test_fraction, seed)
    idx = tr if split == "train" else te
    d = load_digits()
    x = torch.from_numpy(d.data[idx].astype(np.float32) / 16.0)
    x = ((x - DIGITS_MEAN) / DIGITS_STD).reshape(-1, 1, 8, 8).contiguous()
    return x, torch.from_numpy(d.target[idx].astype(np.int64))


# --------------------------------------------------------------------------------------------- fortunes

_OVERSTRIKE = re.compile(r"[^\n]\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SEPARATOR = re.compile(r"^%[ \t]*$", re.MULTILINE)
_ATTRIBUTION = re.compile(r"^\s*--\s*[^-\s]")


def _clean_fortune(text: str) -> str | None:
    """One fortune -> one whitespace-collapsed string, or None when it fails the filters."""
    lines = text.split("\n")
    for i, line in enumerate(lines):  # drop the attribution line ("\t\t-- Mark Twain") and what follows
        if i > 0 and _ATTRIBUTION.match(line):
            lines = lines[:i]
            break
    s = " ".join(" ".join(lines).split())
    if not _FORTUNES_MIN_CHARS <= len(s) <= _FORTUNES_MAX_CHARS:
        return None
    visible = [c for c in s if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    if letters < _FORTUNES_MIN_LETTER_FRACTION * len(visible):
        return None
    return s


def _parse_fortune_files(folder: Path) -> tuple[list[str], list[str]]:
    """Clean, filter and dedupe the quotes of :data:`FORTUNE_CATEGORIES` under ``folder`` (file, then quote order);
    also the category (file name) of each quote."""
    out: list[str] = []
    labels: list[str] = []
    seen: set[str] = set()
    for name in FORTUNE_CATEGORIES:
        path = folder / name
        try:
            text = path.read_bytes().decode("utf-8", errors="replace")
        except OSError as e:
            raise DatasetError(f"cannot read fortune file {path}: {e}") from e
        while True:  # "_\bX" (underline) and "X\bX" (bold) -> "X"
            stripped = _OVERSTRIKE.sub("", text)
            if stripped == text:
                break
            text = stripped
        text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\t", " " * 8))
        for chunk in _SEPARATOR.split(text):
            s = _clean_fortune(chunk)
            if s is None:
                continue
            key = s.casefold()
            if key not in seen:
                seen.add(key)
                out.append(s)
                labels.append(name)
    return out, labels


def _fortunes_all() -> tuple[list[str], list[str]]:
    """Every cleaned quote and its category, from the cache (built on first use)."""
    path = cache_root() / "datasets" / "fortunes" / f"sentences-v{_FORTUNES_RULES_VERSION}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            sentences, labels = data["sentences"], data["labels"]
            if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
                raise TypeError("'sentences' is not a list of strings")
            if not isinstance(labels, list) or len(labels) != len(sentences) or not set(labels) <= set(
                    FORTUNE_CATEGORIES):
                raise TypeError("'labels' is not one category per sentence")
            return sentences, labels
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"corrupt fortunes cache {path}: {e}; delete it to rebuild") from e
    if all((_FORTUNES_SYSTEM_DIR / n).is_file() for n in FORTUNE_CATEGORIES):
        source = str(_FORTUNES_SYSTEM_DIR)
        sentences, labels = _parse_fortune_files(_FORTUNES_SYSTEM_DIR)
    else:
        with tempfile.TemporaryDirectory(prefix="sparsecc-fortunes-") as tmp:
            _fetch_debian_package(_FORTUNES_PACKAGE, Path(tmp))
            folder = Path(tmp) / "usr/share/games/fortunes"
            missing = [n for n in FORTUNE_CATEGORIES if not (folder / n).is_file()]
            if missing:
                raise DatasetError(f"Debian package {_FORTUNES_PACKAGE} lacks the fortune files {missing}")
            source = f"apt-get download {_FORTUNES_PACKAGE}"
            sentences, labels = _parse_fortune_files(folder)
    payload = {"source": source, "package": _FORTUNES_PACKAGE, "rules_version": _FORTUNES_RULES_VERSION,
               "categories": list(FORTUNE_CATEGORIES), "sentences": sentences, "labels": labels}
    _atomic_write_bytes(path, json.dumps(payload, ensure_ascii=False, indent=0).encode("utf-8"))
    return sentences, labels


def _fortunes_split(n: int, split: str, seed: int) -> np.ndarray:
    """Indices of ``split`` ("train" or "heldout") among ``n`` quotes."""
    if split not in ("train", "heldout"):
        raise InvalidArgumentError(f"split must be 'train' or 'heldout', got {split!r}")
    perm = np.random.default_rng(int(seed)).permutation(n)
    n_held = math.ceil(_FORTUNES_HELDOUT_FRACTION * n)
    return perm[:n_held] if split == "heldout" else perm[n_held:]


def fortunes_sentences(split: str = "train", seed: int = 0) -> list[str]:
    """Real English sentences and short quotes for distilling a sentence-embedding model.

    Source: the Debian package ``fortunes`` (the BSD ``fortune`` cookie files;
    the offensive ones live in another package and are not used).  Read from
    ``/usr/share/games/fortunes`` when the package is installed, otherwise
    fetched once with ``apt-get download fortunes`` (under 1 MB, no root).
    The cleaned list is cached as JSON in
    ``<cache_root>/datasets/fortunes/sentences-v2.json`` (with each quote's category).

    Files used: every category of :data:`FORTUNE_CATEGORIES` (computers,
    cookie, debian, definitions, ..., wisdom, work, zippy); the pictures
    (``art``, ``ascii-art``), the ``.dat`` indexes and the ``.u8`` links are
    skipped.  Each file is split on lines holding only ``%``.  Cleaning, per
    quote: terminal overstrikes (``_\\bX``) are removed; the attribution (the
    first line, other than the quote's first, that starts with ``--`` after
    optional indentation, as in ``\\t\\t-- Mark Twain``) and every line after
    it are dropped; whitespace is collapsed to single spaces.  Quotes are kept
    when 20 to 400 characters long and at least 60 % of their non-space
    characters are letters; duplicates (case-insensitive) keep their first
    occurrence.  12 401 quotes pass: 11 160 train, 1 241 held out.

    Parameters
    ----------
    split : {"train", "heldout"}
        ``"heldout"`` is a deterministic 10 % (rounded up) of the quotes;
        ``"train"`` is the rest.  The two never share a quote.
    seed : int
        Seed of the permutation choosing the held-out quotes.

    Returns
    -------
    list of str
        The quotes, in a seed-determined random order; each 20..400 characters.

    Raises
    ------
    ValueError
        ``split`` is not ``"train"`` nor ``"heldout"``.
    DatasetError
        apt-get is missing or fails, the package lacks a category file, or the
        cached JSON is corrupt (the message names the file).
    """
    sentences, _ = _fortunes_all()
    return [sentences[i] for i in _fortunes_split(len(sentences), split, seed)]


#: The categories of the fortune topic task (:func:`fortunes_topics`): files with one subject each.
TOPIC_CATEGORIES = ("computers", "food", "law", "love", "medicine", "politics", "science", "sports")


def fortunes_topics(split: str = "train", seed: int = 0,
                    categories: tuple = TOPIC_CATEGORIES) -> tuple[list[str], torch.Tensor, tuple]:
    """A labeled text task that ships offline: which fortune file (topic) a quote comes from.

    The quotes of :func:`fortunes_sentences` (same cleaning and the same train / held-out split, so a
    held-out quote here is held out there too) whose file is one of ``categories``; the label is the
    file's index in ``categories``. Default: 8 topics (computers, food, law, love, medicine, politics,
    science, sports).

    Parameters
    ----------
    split : {"train", "heldout"}
    seed : int
        As :func:`fortunes_sentences`.
    categories : tuple of str
        Fortune files (names in :data:`FORTUNE_CATEGORIES`), at least two.

    Returns
    -------
    sentences : list of str
    labels : torch.Tensor (n,) int64
        Index into ``categories``.
    categories : tuple of str

    Raises
    ------
    InvalidArgumentError
        Bad ``split``, fewer than two categories, or a name not in :data:`FORTUNE_CATEGORIES`.
    DatasetError
        As :func:`fortunes_sentences`.
    """
    categories = tuple(categories)
    unknown = [c for c in categories if c not in FORTUNE_CATEGORIES]
    if len(set(categories)) < 2 or unknown:
        raise InvalidArgumentError(f"categories must be at least two distinct fortune files of "
                                   f"FORTUNE_CATEGORIES, got {categories}" + (f" (unknown: {unknown})" if unknown else ""))
    sentences, labels = _fortunes_all()
    index = {c: i for i, c in enumerate(categories)}
    chosen = [i for i in _fortunes_split(len(sentences), split, seed) if labels[i] in index]
    return ([sentences[i] for i in chosen], torch.tensor([index[labels[i]] for i in chosen], dtype=torch.int64),
            categories)


# --------------------------------------------------------------------------------------------- loader


def loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128, shuffle: bool = False,
           seed: int = 0) -> DataLoader:
    """A ``DataLoader`` yielding ``(images, labels)`` batches of the given tensors.

    Parameters
    ----------
    images : torch.Tensor
        Shape ``(N, ...)``, e.g. ``(N, 1, 28, 28)``.
    labels : torch.Tensor
        Shape ``(N,)``.
    batch_size : int
        Samples per batch; the last batch may be smaller.
    shuffle : bool
        Reshuffle every epoch, with a generator seeded by ``seed`` (so two
        loaders built with the same seed yield the same batches).
    seed : int
        Seed of the shuffle; unused when ``shuffle`` is False.

    Returns
    -------
    torch.utils.data.DataLoader
        In-process (``num_workers=0``) loader over a ``TensorDataset``.

    Raises
    ------
    ValueError
        ``images`` and ``labels`` have different lengths, or ``batch_size < 1``.
    """
    if len(images) != len(labels):
        raise InvalidArgumentError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
    if int(batch_size) < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(TensorDataset(images, labels), batch_size=int(batch_size), shuffle=shuffle, generator=gen)
