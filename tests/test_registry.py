"""The format registry: candidate keys, candidates per pattern, entries, storage round trips."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecc.runtime  # noqa: F401 - registers the runtime modules and export converters
from sparsecc.errors import InvalidSparsityError, UnsupportedOpError
from sparsecc.formats import (BSR, CSR, DENSE, NM, BlockFormat, BlockSparseMatrix, Candidate, M, NMSparseMatrix,
                              RowSparseMatrix,
                              all_formats, candidates, count_nonzero_blocks, describe, format_of, get_format,
                              register_format)

ALL = [c for f in all_formats() for c in f.calibration_candidates()]


def test_registry_holds_the_four_formats_dense_first():
    assert [f.name for f in all_formats()][:1] == ["dense"]
    assert {f.name for f in all_formats()} >= {"dense", "csr", "bsr", "nm"}
    assert get_format("nm") is NM and get_format("csr") is CSR
    with pytest.raises(InvalidSparsityError, match="unknown format 'coo'"):
        get_format("coo")
    with pytest.raises(InvalidSparsityError, match="already registered"):
        register_format(BlockFormat("bsr", ((2, 2),), ("block",)))


@pytest.mark.parametrize("cand", ALL, ids=lambda c: c.key)
def test_keys_round_trip_and_names_are_clean(cand):
    assert Candidate.parse(cand.key) == cand
    assert re.fullmatch(r"[a-z0-9_]+", cand.slug), cand.slug
    assert cand.label.split()[0] == cand.format


def test_keys_are_the_calibration_names():
    assert [Candidate("dense").key, Candidate("csr", (1, 1)).key, Candidate("bsr", (16, 1)).key,
            Candidate("nm", (2, 4)).key] == ["dense", "csr_1x1", "bsr_16x1", "nm_2:4"]
    assert Candidate("csr", (1, 1)).slug == "csr" and Candidate("nm", (2, 4)).slug == "nm_2x4"
    assert Candidate("bsr", (8, 1)).kernel_name("linear", "gemm", True, "gelu") == "bsr_8x1_gemm_bias_gelu"
    with pytest.raises(InvalidSparsityError, match="candidate key"):
        Candidate.parse("coo_3")


def test_candidates_follow_the_pattern_argument():
    shape = (64, 48)
    assert candidates(shape, "dense", 0.1) == [Candidate("dense")]
    assert candidates(shape, "auto", 1.0) == [Candidate("dense")]
    assert candidates(shape, "unstructured", 0.1) == [Candidate("dense"), Candidate("csr", (1, 1)), Candidate("xcsr")]
    block = candidates(shape, "block", 0.1)
    assert block[0] == Candidate("dense") and {c.format for c in block[1:]} == {"bsr"}
    assert {c.params for c in block[1:]} == set(BSR.blocks)  # 64x48 is tiled by every block
    assert Candidate("bsr", (16, 1)) not in candidates((40, 48), "block", 0.1)  # 16 does not divide 40
    assert Candidate("bsr", (1, 4)) not in candidates((64, 12), "auto", 0.1, column_group=6)
    assert Candidate("nm", (2, 4)) in candidates(shape, "auto", 0.5, nm=(2, 4))
    assert candidates(shape, "2:4", 0.5, nm=(2, 4)) == [Candidate("dense"), Candidate("nm", (2, 4))]
    assert candidates(shape, "auto", 0.1, allowed={"csr"}) == [Candidate("dense"), Candidate("csr", (1, 1))]


def test_cost_expressions_match_hand_counts():
    assert DENSE.flops((), 3, 5, 0).subs(M, 2) == 2 * 2 * 3 * 5
    assert CSR.flops((1, 1), 8, 8, 10).subs(M, 4) == 2 * 4 * 10
    assert BSR.bytes((16, 1), 32, 8, 3).subs(M, 1) == 4 * 48 + 4 * 3 + 4 * 3 + 4 * 8 + 4 * 32
    assert NM.stored((2, 4), (8, 10), 0, {}) == 8 * 3 * 2  # K = 10 -> 3 groups
    assert BSR.stored((4, 1), (8, 8), 12, {(4, 1): 2.0}) == 6


def test_entries_name_where_their_pieces_live():
    sparsecc.runtime.register_kernels()
    text = describe("nm")
    assert "sparsecc.formats.nm.NMSparseMatrix" in text
    assert "module[x86, linear]: sparsecc.runtime.nm.cpu_nm_linear" in text
    assert "export[linear]: sparsecc.runtime.nm.export_nm_linear" in text
    assert "module[x86, conv2d]: sparsecc.runtime.conv.cpu_conv" in describe("bsr")
    with pytest.raises(UnsupportedOpError, match="no conv2d kernel module for target 'cuda'"):
        BSR.module_factory("cuda", "conv2d")
    assert "export[linear]: sparsecc.runtime.dense.export_dense_linear" in describe("dense")
    assert "export[conv2d]: sparsecc.runtime.dense.export_dense_conv" in describe("dense")
    with pytest.raises(UnsupportedOpError, match="no export path"):
        NM.exporter("conv2d")


@settings(max_examples=30, deadline=None)
@given(cand=st.sampled_from([c for c in ALL if not c.is_dense]), rows=st.integers(1, 4), cols=st.integers(1, 4),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_storage_round_trip_of_every_format(cand, rows, cols, density, seed):
    fmt = cand.entry
    unit = {"nm": (1, cand.params[1] if cand.params else 1), "xcsr": (1, 1)}.get(cand.format, cand.params)
    n, k = rows * unit[0] * 2, cols * unit[1] * 2
    w = fmt.calibration_weight(cand.params, n, k, density, seed)
    s = cand.to_storage(w)
    assert format_of(s) is fmt
    assert torch.equal(s.to_dense(), w)
    if cand.format == "nm":
        assert isinstance(s, NMSparseMatrix) and fmt.units_of(s) == n * (k // cand.params[1]) * cand.params[0]
    elif cand.format == "xcsr":
        assert isinstance(s, RowSparseMatrix) and fmt.units_of(s) == int(torch.count_nonzero(w))
    else:
        assert isinstance(s, BlockSparseMatrix) and fmt.units_of(s) == count_nonzero_blocks(w, cand.params)
