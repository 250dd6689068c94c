"""The harness's tensor-file format and the .deb reader, without the toolchain."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.errors import ToolchainError
from sparsecc.fetch import extract_deb
from sparsecc.targets.qemu import read_tensors, write_tensors

DTYPES = ["float32", "float64", "int32", "int64", "int16", "int8", "uint8", "uint16", "uint32"]


@settings(max_examples=30, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=0, max_size=4),
       dtype=st.sampled_from(DTYPES))
def test_tensor_file_round_trip(tmp_path_factory, shapes, dtype):
    path = tmp_path_factory.mktemp("t") / "x.bin"
    arrays = [np.asarray(np.random.default_rng(0).standard_normal(s) * 100).astype(dtype) for s in shapes]
    write_tensors(path, arrays)
    back = read_tensors(path)
    assert len(back) == len(arrays)
    for a, b in zip(arrays, back):
        assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def test_tensor_file_accepts_torch_and_rejects_bad_files(tmp_path):
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # non-contiguous
    write_tensors(tmp_path / "a.bin", [t])
    assert np.array_equal(read_tensors(tmp_path / "a.bin")[0], t.numpy())
    raw = (tmp_path / "a.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(raw[:-5])
    with pytest.raises(ToolchainError, match="truncated"):
        read_tensors(tmp_path / "short.bin")
    (tmp_path / "bad.bin").write_bytes(b"NOTMAGIC" + raw[8:])
    with pytest.raises(ToolchainError, match="bad magic"):
        read_tensors(tmp_path / "bad.bin")
    with pytest.raises(ToolchainError, match="complex64"):
        write_tensors(tmp_path / "c.bin", [np.zeros(2, np.complex64)])


def _fake_deb(files: dict) -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    out = b"!<arch>\n"
    for name, body in (("debian-binary", b"2.0\n"), ("data.tar.gz", data.getvalue())):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        out += b"\n" if len(body) % 2 else b""
    return out


def test_extract_deb_pure_python_fallback(tmp_path, monkeypatch):
    from sparsecc import fetch

    deb = tmp_path / "x_1.0_all.deb"
    deb.write_bytes(_fake_deb({"./usr/bin/tool": b"#!/bin/sh\n", "./usr/share/a.txt": b"hello"}))
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)  # no dpkg-deb
    extract_deb(deb, tmp_path / "out")
    assert (tmp_path / "out/usr/share/a.txt").read_bytes() == b"hello"
    (tmp_path / "junk.deb").write_bytes(b"not an archive")
    with pytest.raises(ToolchainError, match="not a Debian package"):
        extract_deb(tmp_path / "junk.deb", tmp_path / "out2")
