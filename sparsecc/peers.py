"""The engines sparsecc is measured against, on the same weights: ONNX export of a Hugging Face encoder and
an onnxruntime session of it (``pip install -e .[bench]``). Used by ``examples/minilm.py`` and
``benchmarks/peers.py`` (which also runs DeepSparse on the exported file, in its own environment).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["Hidden", "onnx_export", "ort_session"]


class Hidden(torch.nn.Module):
    """``(input_ids, attention_mask) -> last_hidden_state`` (batch, seq, dim) of an encoder: what every engine runs."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def onnx_export(model: torch.nn.Module, enc: dict, path: Path, dynamic_batch: bool = False) -> None:
    """ONNX (opset 17) of ``Hidden(model)`` at the shapes of ``enc`` (``input_ids``, ``attention_mask``: (batch, seq)).

    A copy is exported: the TorchScript exporter leaves the model it traced switched to eager attention
    (measured 2x slower afterwards). ``dynamic_batch``: the batch dim is left symbolic.
    """
    axes = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}} if dynamic_batch else None
    torch.onnx.export(Hidden(copy.deepcopy(model)), (enc["input_ids"], enc["attention_mask"]), str(path),
                      input_names=["input_ids", "attention_mask"], output_names=["hidden"], opset_version=17,
                      dynamo=False, dynamic_axes=axes)


def ort_session(path: Path, threads: int) -> Optional[Callable]:
    """``(input_ids, attention_mask) -> hidden`` (numpy) by onnxruntime on ``threads`` intra-op threads, or None
    when onnxruntime is not installed. Spinning is off: ORT's worker threads spin after each run by default and
    take the cores from the engines timed after it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda input_ids, attention_mask: sess.run(None, {"input_ids": input_ids.numpy(),
                                                             "attention_mask": attention_mask.numpy()})[0]
