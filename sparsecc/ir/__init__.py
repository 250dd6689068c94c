"""Graph IR: captured FX graph plus sparsity annotations."""

from .annotations import META_KEY, LayerAnnotation, annotate, get_annotation
from .capture import capture, normalize_inputs
from .graph import InputSpec, LinearSite, SparseGraph

__all__ = ["META_KEY", "LayerAnnotation", "annotate", "get_annotation", "capture",
           "normalize_inputs", "InputSpec", "LinearSite", "SparseGraph"]
