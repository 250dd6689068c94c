"""Save all-MiniLM-L6-v2 as a torch.export program for the command line: ``python examples/export_minilm_pt2.py``.

Writes ``minilm.pt2`` (or the path given as the first argument): the encoder called as
``(input_ids, attention_mask) -> last hidden state (batch, seq, 384)``, exported from a batch-1, 128-token
example with a dynamic batch dim (1..64); the program stores its example inputs. Then::

    sparsecc compile minilm.pt2 --sparsity 0.8 --pattern auto -o build/
    sparsecc bench minilm.pt2 --sparsity 0.8 --batch 1 8 --runs 5
"""

import sys

import torch

from sparsecc.zoo import minilm


class Encoder(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def main(path: str = "minilm.pt2") -> None:
    bert, tok = minilm()
    enc = tok(["sparsecc compiles sparse neural networks."], padding="max_length", max_length=128,
              truncation=True, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"])
    model = Encoder(bert).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    try:  # a size-1 example would pin the dim to 1: trace batch 2, store the batch-1 example
        ep = torch.export.export(model, tuple(a.expand(2, -1) for a in args), dynamic_shapes=({0: batch}, {0: batch}))
        ep.example_inputs = (args, {})
    except Exception as e:  # a model that pins the batch dim: keep the static export
        print(f"dynamic batch not exportable ({type(e).__name__}); saving a static batch-1 program", file=sys.stderr)
        ep = torch.export.export(model, args)
    torch.export.save(ep, path)
    print(f"wrote {path}: inputs {[tuple(a.shape) for a in args]}")


if __name__ == "__main__":
    main(*sys.argv[1:])
