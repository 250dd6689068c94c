"""sparsecc.datasets: shapes, dtypes, normalization, splits, the IDX parser, fortunes cleaning."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from sparsecc import datasets
from sparsecc.errors import DatasetError, SparseccError


def _idx_bytes(arr: np.ndarray, code: int) -> bytes:
    be = arr.astype(arr.dtype.newbyteorder(">"))
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + be.tobytes()


# --------------------------------------------------------------------------------------------- IDX


def test_read_idx_uint8_plain_and_gzip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 7
    plain = tmp_path / "x-idx3-ubyte"
    plain.write_bytes(_idx_bytes(arr, 0x08))
    gz = tmp_path / "x-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(_idx_bytes(arr, 0x08)))
    for p in (plain, gz):
        out = datasets.read_idx(p)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, arr)
    assert datasets.read_idx(plain)[1, 2, 3] == (23 * 7) % 256


def test_read_idx_big_endian_types(tmp_path):
    i32 = np.array([[1, -2, 70000]], dtype=np.int32)
    f32 = np.array([0.5, -1.25, 3.0e6], dtype=np.float32)
    (tmp_path / "i").write_bytes(_idx_bytes(i32, 0x0C))
    (tmp_path / "f").write_bytes(_idx_bytes(f32, 0x0D))
    out_i = datasets.read_idx(tmp_path / "i")
    out_f = datasets.read_idx(tmp_path / "f")
    assert out_i.shape == (1, 3) and out_i.tolist() == [[1, -2, 70000]]
    assert out_f.dtype == np.float32 and out_f.tolist() == [0.5, -1.25, 3.0e6]


def test_read_idx_corrupt_magic_names_file(tmp_path):
    good = _idx_bytes(np.zeros((2, 2), np.uint8), 0x08)
    bad = tmp_path / "corrupt-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(DatasetError, match="corrupt-images-idx3-ubyte") as info:
        datasets.read_idx(bad)
    assert isinstance(info.value, SparseccError) and isinstance(info.value, RuntimeError)
    assert "magic" in str(info.value)


def test_read_idx_bad_type_size_and_gzip(tmp_path):
    unknown = tmp_path / "unknown-type"
    unknown.write_bytes(bytes([0, 0, 0x42, 1]) + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DatasetError, match="unknown-type.*0x42"):
        datasets.read_idx(unknown)
    short = tmp_path / "truncated"
    short.write_bytes(_idx_bytes(np.zeros((3, 3), np.uint8), 0x08)[:-1])
    with pytest.raises(DatasetError, match="truncated.*size mismatch"):
        datasets.read_idx(short)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(_idx_bytes(np.zeros(50, np.uint8), 0x08))[:-12])
    with pytest.raises(DatasetError, match="broken.gz"):
        datasets.read_idx(broken_gz)


# --------------------------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_normalization():
    x, y = datasets.digits("train")
    xt, yt = datasets.digits("test")
    assert x.shape == (1347, 1, 8, 8) and xt.shape == (450, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.shape == (1347,) and yt.shape == (450,)
    lo, hi = -datasets.DIGITS_MEAN / datasets.DIGITS_STD, (1 - datasets.DIGITS_MEAN) / datasets.DIGITS_STD
    assert x.min().item() == pytest.approx(lo, abs=1e-5) and x.max().item() == pytest.approx(hi, abs=1e-5)
    allx = torch.cat([x, xt])
    assert allx.mean().item() == pytest.approx(0.0, abs=2e-3)
    assert allx.std().item() == pytest.approx(1.0, abs=2e-3)
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) == set(range(10))


def test_digits_split_disjoint_stratified_deterministic():
    tr, te = datasets.digits_split_indices(0.25, seed=0)
    assert len(tr) == 1347 and len(te) == 450
    assert not set(tr.tolist()) & set(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(1797))
    # stratified: each class's test share within one image of 25 %
    from sklearn.datasets import load_digits

    target = load_digits().target
    for c in range(10):
        n_c = int((target == c).sum())
        assert abs(int((target[te] == c).sum()) - 0.25 * n_c) <= 1
    tr2, te2 = datasets.digits_split_indices(0.25, seed=0)
    np.testing.assert_array_equal(te, te2)
    _, te3 = datasets.digits_split_indices(0.25, seed=1)
    assert not np.array_equal(te, te3)
    # the tensors follow the indices
    x, y = datasets.digits("test", seed=0)
    np.testing.assert_array_equal(y.numpy(), target[te])
    xs, _ = datasets.digits("test", test_fraction=0.1)
    assert xs.shape[0] == 180
    with pytest.raises(ValueError):
        datasets.digits("valid")
    with pytest.raises(ValueError):
        datasets.digits_split_indices(1.0)


def test_loader_batches_and_seeded_shuffle():
    x, y = datasets.digits("test")
    dl = datasets.loader(x, y, batch_size=128, shuffle=False)
    batches = list(dl)
    assert [len(b[1]) for b in batches] == [128, 128, 128, 66]
    assert torch.equal(batches[0][0], x[:128])
    a = [b[1] for b in datasets.loader(x, y, 64, shuffle=True, seed=3)]
    b = [b[1] for b in datasets.loader(x, y, 64, shuffle=True, seed=3)]
    c = [b[1] for b in datasets.loader(x, y, 64, shuffle=True, seed=4)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    assert sorted(torch.cat(a).tolist()) == sorted(y.tolist())
    with pytest.raises(ValueError):
        datasets.loader(x, y[:-1], 8)


# --------------------------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_shapes_labels_and_normalization():
    x, y = datasets.fashion_mnist("train")
    xt, yt = datasets.fashion_mnist("test")
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [6000] * 10
    assert torch.bincount(yt).tolist() == [1000] * 10
    assert x.mean().item() == pytest.approx(0.0, abs=2e-3)
    assert x.std().item() == pytest.approx(1.0, abs=2e-3)
    assert x.min().item() == pytest.approx(-datasets.FASHION_MEAN / datasets.FASHION_STD, abs=1e-5)
    with pytest.raises(ValueError):
        datasets.fashion_mnist("validation")


def test_fashion_mnist_cache_corrupt_file_raises_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_FASHION_SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "datasets" / "fashion-mnist"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        for name in datasets._FASHION_FILES[split]:
            (folder / name).write_bytes(gzip.compress(b"not an idx file"))
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz"):
        datasets.fashion_mnist("test")


# --------------------------------------------------------------------------------------------- fortunes


def test_fortunes_sentences_bounds_and_split():
    train = datasets.fortunes_sentences("train")
    held = datasets.fortunes_sentences("heldout")
    assert len(held) >= 300 and len(train) >= 8 * len(held)
    assert len(held) == -(-(len(train) + len(held)) // 10)  # ceil(10 %)
    assert not set(train) & set(held)
    for s in train + held:
        assert 20 <= len(s) <= 400
        assert s == " ".join(s.split())  # whitespace collapsed
        assert "\x08" not in s and "\t" not in s
        visible = [c for c in s if not c.isspace()]
        assert sum(c.isalpha() for c in visible) >= 0.6 * len(visible)
    assert len({s.casefold() for s in train + held}) == len(train) + len(held)
    assert datasets.fortunes_sentences("heldout") == held  # deterministic
    other = datasets.fortunes_sentences("heldout", seed=1)
    assert len(other) == len(held) and other != held
    with pytest.raises(ValueError):
        datasets.fortunes_sentences("test")


def test_fortunes_topics_labels_and_split():
    train_s, train_y, cats = datasets.fortunes_topics("train")
    held_s, held_y, _ = datasets.fortunes_topics("heldout")
    assert cats == datasets.TOPIC_CATEGORIES and len(cats) == 8
    assert len(train_s) == len(train_y) and len(held_s) == len(held_y) and len(held_s) >= 100
    assert train_y.dtype == torch.int64 and set(train_y.tolist()) == set(range(8))
    assert not set(train_s) & set(held_s)
    assert set(held_s) <= set(datasets.fortunes_sentences("heldout"))  # the same held-out split
    assert set(train_s) <= set(datasets.fortunes_sentences("train"))
    two, y2, c2 = datasets.fortunes_topics("train", categories=("sports", "law"))
    assert c2 == ("sports", "law") and set(y2.tolist()) == {0, 1}
    assert set(two) <= set(train_s)
    for bad in (("sports",), ("sports", "sports"), ("sports", "nope")):
        with pytest.raises(ValueError, match="categories"):
            datasets.fortunes_topics("train", categories=bad)


def test_fortune_cleaning_rules(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FORTUNE_CATEGORIES", ("one", "two"))
    (tmp_path / "one").write_text(
        "A dream will always triumph over reality, once it is given the chance.\n"
        "\t\t-- Stanislaw Lem\n%\n"
        "Too short.\n%\n"
        "_\bU_\bn_\bd_\be_\br_\bl_\bi_\bn_\be_\bd words   are\tstill words here.\n%\n"
        "$ ls -l | awk '{print $5}' | sort -n | tail -1 >> /tmp/x\n%\n"
        + "x" * 401 + "\n%\n")
    (tmp_path / "two").write_text("A DREAM will always triumph over reality, once it is given the chance.\n%\n"
                                  "Another quote that is long enough to keep.\n")
    out, labels = datasets._parse_fortune_files(tmp_path)
    assert out == ["A dream will always triumph over reality, once it is given the chance.",
                   "Underlined words are still words here.",
                   "Another quote that is long enough to keep."]
    assert labels == ["one", "one", "two"]  # the duplicate in "two" keeps its first file
