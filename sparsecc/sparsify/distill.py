"""Knowledge distillation of a pruned sentence encoder to its dense teacher.

The loss is ``1 - cos`` of the mean-pooled sentence embeddings plus the mean
squared error of the last hidden states over real tokens (the embedding and
hidden-state terms of TinyBERT's layer-wise distillation, Jiao et al. 2020, at
the last layer only). The student may have fewer heads and FFN neurons than the
teacher (structured pruning) but the same hidden size; masks, when given, are
re-applied after every step so that pruned weights stay zero.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..zoo import mean_pool

__all__ = ["distill_encoder"]


def distill_encoder(student: nn.Module, teacher: nn.Module, batch: Callable[[int], dict], steps: int, lr: float, *,
                    masks: Optional[dict] = None, frozen: tuple = ("embeddings",), seed: int = 0,
                    log_every: int = 50, log: Callable[[str], None] = print) -> list:
    """Train ``student`` (in place) to reproduce ``teacher``'s embeddings and last hidden states.

    Parameters
    ----------
    student, teacher : nn.Module
        Hugging Face-style encoders called as ``model(**enc)`` with an output that has ``last_hidden_state``
        ``(B, S, H)``; same H.
    batch : callable step -> dict
        The tokenizer output (``input_ids``, ``attention_mask``, ...) of each step.
    steps : int
        AdamW steps (weight decay 0).
    lr : float
    masks : dict parameter name -> bool Tensor, optional
        Multiplied into those parameters after every step (their zeros stay zeros).
    frozen : tuple of str
        Parameters whose name contains one of these are not trained (the embedding tables).
    seed : int
        Seeds torch's RNG (dropout).

    Returns
    -------
    list of float
        The loss of every step.
    """
    params = dict(student.named_parameters())
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for n, p in params.items() if not any(f in n for f in frozen)], lr=lr,
                            weight_decay=0.0)
    student.train()
    losses = []
    for step in range(steps):
        enc = batch(step)
        with torch.no_grad():
            t_out = teacher(**enc).last_hidden_state
        s_out = student(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        cos = F.cosine_similarity(mean_pool(s_out, enc["attention_mask"]), mean_pool(t_out, enc["attention_mask"]),
                                  dim=-1)
        loss = (1 - cos).mean() + ((s_out - t_out).pow(2) * mask).sum() / mask.sum() / s_out.shape[-1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if masks:
            with torch.no_grad():
                for n, m in masks.items():
                    params[n].mul_(m)
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            log(f"  distillation step {step + 1}/{steps}: loss {losses[-1]:.4f}")
    student.eval()
    return losses
