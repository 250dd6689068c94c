"""Sensitivity analysis: the metric drop when one layer alone is pruned.

For each prunable layer and each candidate (pattern, density), the layer is
pruned one-shot by the chosen importance score while every other layer stays
dense, and the user's metric is measured on a calibration split. The table is
cached on disk (one JSON file per model, weights, candidates and score; written
atomically after every layer so an interrupted sweep resumes and never leaves a
half-written file).

Source: layer-wise sensitivity scans as in Han et al., "Learning both Weights
and Connections" (NeurIPS 2015), fig. 5, and Distiller's sensitivity analysis.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import CacheWarning
from ..fileio import atomic_path
from .patterns import Pattern, as_matrix, from_matrix, mask_from_scores


def option_key(pattern: Pattern, density: float) -> str:
    """``"block 8x1@0.200"``: a (pattern, density) option of the sparsity allocation, as a cache key.

    Not a format candidate (:class:`sparsecc.formats.Candidate`): an option is what pruning does to a layer.
    """
    return f"{pattern}@{density:.3f}"


def model_fingerprint(layers: dict) -> str:
    """SHA-256 over the layers' names, shapes and weight bytes."""
    h = hashlib.sha256()
    for name, mod in layers.items():
        w = mod.weight.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()[:20]


def _atomic_write_json(path: Path, data) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    except OSError as e:  # a read-only cache: the table is used for this run, just not kept
        warnings.warn(f"sensitivity table {path} not written ({e})", CacheWarning, stacklevel=2)


def sensitivity_analysis(layers: dict, candidates: dict, scores: Callable[[str, torch.Tensor], torch.Tensor],
                         eval_fn: Callable[[], float], cache_path: Optional[Path] = None,
                         progress: bool = True) -> dict:
    """Metric drop of every (layer, candidate) with that layer alone pruned.

    Parameters
    ----------
    layers : dict name -> nn.Module
        Layers with a ``weight`` (C_out, ...), in the model ``eval_fn`` evaluates.
    candidates : dict name -> list of (Pattern, density)
        What to try per layer.
    scores : callable (name, weight) -> Tensor, the weight's shape
        Importance of each weight (higher = keep).
    eval_fn : callable () -> float
        The metric of the current model, higher is better.
    cache_path : Path, optional
        JSON cache; entries already there are reused.
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict with ``"base"`` (metric of the unpruned model) and ``"drop"``:
    name -> {candidate key -> base - metric}.
    """
    from tqdm.auto import tqdm

    cache = {}
    if cache_path is not None and cache_path.exists():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError) as e:  # unreadable: measure again and overwrite it
            warnings.warn(f"sensitivity table {cache_path} is unreadable ({type(e).__name__}); measuring again",
                          CacheWarning, stacklevel=2)
            cache = {}
    if "base" not in cache:
        cache = {"base": float(eval_fn()), "drop": {}}
    drops = cache["drop"]
    todo = [(n, p, d) for n, cands in candidates.items() for p, d in cands
            if option_key(p, d) not in drops.get(n, {})]
    bar = tqdm(total=len(todo), desc="sensitivity", disable=not progress or not todo, leave=False)
    try:
        for name, mod in layers.items():
            mine = [(p, d) for (n, p, d) in todo if n == name]
            if not mine:
                continue
            w = mod.weight
            saved = w.detach().clone()
            sc = as_matrix(scores(name, saved))
            try:
                for p, d in mine:
                    keep = from_matrix(mask_from_scores(sc, d, p), saved.shape)
                    with torch.no_grad():
                        w.copy_(saved * keep)
                    drops.setdefault(name, {})[option_key(p, d)] = cache["base"] - float(eval_fn())
                    bar.update(1)
            finally:
                with torch.no_grad():
                    w.copy_(saved)
            if cache_path is not None:
                _atomic_write_json(cache_path, cache)
    finally:
        bar.close()
    return cache
