"""A grammar of small models for the fuzz suite (``tests/test_fuzz.py``, ``benchmarks/fuzz.py``).

A hypothesis strategy draws a *spec* (plain data: layers, shapes, dtype, sparsity, pattern); :func:`build`
turns it into a model and its input; :func:`check` compiles it and decides the outcome:

* ``"ok:sparse"`` / ``"ok:dense"``: ``compile`` gave a module equal to ``sparsecc.prune``'s torch reference
  within tolerance, with at least one sparse kernel / with every layer dense (two thirds of the specs force
  the best-estimated sparse format of every layer, see :func:`sparse_kernels_forced`);
* ``"error:<Class>"``: ``compile`` raised that :class:`~sparsecc.SparseccError` subclass;
* ``"mismatch"``: anything else (a result that differs, a foreign exception, a modified user model); the
  suite asserts there are none.

Sequence models take (B, S, D): linears with and without bias and activations, attention
(``nn.MultiheadAttention``), layer norms, dropout, a shared (tied) linear used twice, and a layer with
value-dependent control flow that cannot be captured. Image models take
(B, C, H, W): convs 1x1 and 3x3, strided, padded, a ``Conv2d`` subclass that pads in its own ``forward``,
depthwise and dilated convs (no sparse kernel: they stay dense), batch norm, ReLU/ReLU6, then a linear head.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import sparsecc
from sparsecc.errors import SparseccError

PATTERNS = ("unstructured", "block", "2:4", "auto")


class PadConv(nn.Conv2d):
    """A conv that pads in its own forward (the conv op it runs has padding 0)."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


class Shared(nn.Module):
    """One linear applied twice (a tied weight: one parameter, two uses)."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


class DataDependent(nn.Module):
    """Control flow on a tensor's value: neither torch.export nor torch.fx can capture it (a CaptureError)."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(x) if float(x.sum()) > 0 else -self.fc(x)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        return x + self.mha(x, x, x, need_weights=False)[0]


SEQ_LAYERS = ("linear", "linear_relu", "linear_gelu", "linear_nobias", "attention", "layernorm", "dropout", "shared",
              "datadep")
IMG_LAYERS = ("conv1x1", "conv3x3", "conv3x3_s2", "conv_relu", "conv_relu6", "padconv", "depthwise", "dilated",
              "batchnorm")


@st.composite
def specs(draw):
    """A model spec: ``{"family", "layers", "dims", "dtype", "sparsity", "pattern", "batch", "seed"}``."""
    family = draw(st.sampled_from(["seq", "img"]))
    names = SEQ_LAYERS if family == "seq" else IMG_LAYERS
    layers = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4))
    dims = draw(st.lists(st.sampled_from([8, 16, 32]), min_size=len(layers) + 1, max_size=len(layers) + 1))
    return {"family": family, "layers": layers, "dims": dims,
            "dtype": draw(st.sampled_from(["float32"] * 6 + ["float64"])),
            "sparsity": draw(st.sampled_from([0.0, 0.5, 0.8])), "pattern": draw(st.sampled_from(PATTERNS)),
            "batch": draw(st.integers(1, 3)), "extent": draw(st.sampled_from([1, 5, 8])),
            "force_sparse": draw(st.sampled_from([True, True, False])), "seed": draw(st.integers(0, 2 ** 16))}


@contextlib.contextmanager
def sparse_kernels_forced(on: bool):
    """Make compile pick the best-estimated *sparse* format of every layer that has one (tiny fuzz layers
    would otherwise rightly stay dense, and the kernels would go unchecked)."""
    if not on:
        yield
        return
    from sparsecc.formats import Candidate
    from sparsecc.passes import choose_format, conv

    original = choose_format.choose

    def forced(est, where, density, pattern, measure=None):
        sparse = {k: v for k, v in est.items() if not Candidate.parse(k).is_dense}
        if not sparse:
            return original(est, where, density, pattern, None)
        return Candidate.parse(min(sparse, key=sparse.get)), None, None, "forced sparse (fuzz)"

    choose_format.choose = conv.choose = forced
    try:
        yield
    finally:
        choose_format.choose = conv.choose = original


def build(spec: dict):
    """``(model, example input)`` of a spec (the model in eval mode, seeded)."""
    torch.manual_seed(spec["seed"])
    mods, d = [], spec["dims"][0]
    for name, d_out in zip(spec["layers"], spec["dims"][1:]):
        if spec["family"] == "seq":
            if name.startswith("linear"):
                mods.append(nn.Linear(d, d_out, bias=name != "linear_nobias"))
                mods += [nn.ReLU()] if name == "linear_relu" else [nn.GELU()] if name == "linear_gelu" else []
                d = d_out
            elif name == "attention":
                mods.append(Attention(d, 2 if d % 2 == 0 else 1))
            elif name == "layernorm":
                mods.append(nn.LayerNorm(d))
            elif name == "dropout":
                mods.append(nn.Dropout(0.3))
            elif name == "shared":
                mods.append(Shared(d))
            elif name == "datadep":
                mods.append(DataDependent(d))
        else:
            if name in ("conv1x1", "conv3x3", "conv3x3_s2", "conv_relu", "conv_relu6"):
                k = 1 if name == "conv1x1" else 3
                mods.append(nn.Conv2d(d, d_out, k, stride=2 if name == "conv3x3_s2" else 1, padding=k // 2))
                mods += [nn.ReLU()] if name == "conv_relu" else [nn.ReLU6()] if name == "conv_relu6" else []
                d = d_out
            elif name == "padconv":
                mods.append(PadConv(d, d_out, 3))
                d = d_out
            elif name == "depthwise":
                mods.append(nn.Conv2d(d, d, 3, padding=1, groups=d))
            elif name == "dilated":
                mods.append(nn.Conv2d(d, d_out, 3, padding=2, dilation=2))
                d = d_out
            elif name == "batchnorm":
                bn = nn.BatchNorm2d(d)
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
                mods.append(bn)
    if spec["family"] == "img":
        mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(d, 4)]
    dtype = getattr(torch, spec["dtype"])
    model = nn.Sequential(*mods).to(dtype).eval()
    b, e = spec["batch"], spec["extent"]
    shape = (b, e, spec["dims"][0]) if spec["family"] == "seq" else (b, spec["dims"][0], e + 3, e + 3)
    return model, torch.randn(*shape, dtype=dtype)


def _compile_and_reference(model, x, spec):
    s, pattern = spec["sparsity"], spec["pattern"]
    if pattern == "2:4":
        return (lambda: sparsecc.compile(model, (x,), pattern="2:4", measure=False)), \
            (lambda: sparsecc.prune(model, pattern="2:4"))
    if pattern == "block":
        return (lambda: sparsecc.compile(model, (x,), sparsity=s, pattern="block", block_shape=(4, 1),
                                         measure=False)), (lambda: sparsecc.prune(model, s, block_shape=(4, 1)))
    return (lambda: sparsecc.compile(model, (x,), sparsity=s, pattern=pattern, measure=False)), \
        (lambda: sparsecc.prune(model, s))


def check(spec: dict) -> tuple:
    """``(outcome, detail)`` for one spec (see the module docstring)."""
    model, x = build(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compile_fn, ref_fn = _compile_and_reference(model, x, spec)
    with warnings.catch_warnings(), sparse_kernels_forced(spec.get("force_sparse", False)):
        warnings.simplefilter("ignore")
        try:
            cm = compile_fn()
        except SparseccError as e:
            outcome, detail = f"error:{type(e).__name__}", str(e)[:200]
        except Exception as e:  # noqa: BLE001 - a foreign exception is the finding
            return "mismatch", f"compile raised {type(e).__name__}: {e}"
        else:
            try:
                y = cm(x)
                with torch.no_grad():
                    ref = ref_fn()(x)
            except Exception as e:  # noqa: BLE001
                return "mismatch", f"calling raised {type(e).__name__}: {e}"
            tol = 1e-3 * max(1.0, float(ref.abs().max()))
            if y.shape != ref.shape or not torch.allclose(y.to(ref.dtype), ref, atol=tol, rtol=1e-3, equal_nan=True):
                diff = float((y.to(ref.dtype) - ref).abs().max()) if y.shape == ref.shape else float("nan")
                return "mismatch", f"max abs diff {diff:.3g} (tolerance {tol:.1e}), shapes {tuple(y.shape)}"
            formats = sorted({a.format for a in cm.layers} - {"dense"})
            outcome, detail = ("ok:sparse" if formats else "ok:dense"), ",".join(formats)
    after = model.state_dict()
    if set(after) != set(before) or any(not torch.equal(after[k], before[k]) for k in before) or model.training:
        return "mismatch", "the user's model changed"
    return outcome, detail
