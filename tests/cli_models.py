"""Small models for tests/test_cli.py, loaded by the command line as ``tests.cli_models:mlp``."""

import torch


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def mlp():
    """``(model, example_inputs)``: a 2-layer MLP, input ``(batch=4, 64)``."""
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(4, 64),)
