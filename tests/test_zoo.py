"""sparsecc.zoo: model shapes, training to a target accuracy, pretrained cache."""

from __future__ import annotations

import time

import pytest
import torch

from sparsecc import datasets, zoo


@pytest.fixture(autouse=True)
def one_thread():
    """Train on one thread: on a shared, oversubscribed machine torch's OpenMP threads wait on each
    other and these tiny models train up to 50x slower with 2 threads (measured: 0.5-1.6 s vs 14-78 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _linear_share(model: torch.nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    lin = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    return lin / total


def test_model_shapes_and_linear_share():
    torch.manual_seed(0)
    f, d = zoo.FashionCNN(), zoo.DigitsCNN()
    assert f(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert d(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert sum(p.numel() for p in f.parameters()) == 1_630_602
    assert sum(p.numel() for p in d.parameters()) == 132_650
    assert _linear_share(f) > 0.98 and _linear_share(d) > 0.99
    assert [m.weight.shape for m in f.modules() if isinstance(m, torch.nn.Linear)] == [(512, 3136), (10, 512)]


def test_digits_cnn_trains_to_95_percent():
    x, y = datasets.digits("train")
    xt, yt = datasets.digits("test")
    torch.manual_seed(0)
    model = zoo.DigitsCNN()
    before = zoo.accuracy(model, (xt, yt))
    t0 = time.perf_counter()
    zoo.train(model, datasets.loader(x, y, batch_size=64, shuffle=True, seed=0), epochs=15, progress=False)
    elapsed = time.perf_counter() - t0
    acc = zoo.accuracy(model, (xt, yt))
    assert before < 30.0
    assert acc >= 95.0, acc
    assert elapsed < 10.0, elapsed
    # a loader gives the same number as tensors; the train/eval mode is restored
    model.train()
    assert zoo.accuracy(model, datasets.loader(xt, yt, batch_size=100)) == pytest.approx(acc)
    assert model.training
    model.eval()
    zoo.train(model, datasets.loader(x[:64], y[:64], 64), epochs=1, progress=False)
    assert not model.training


def test_accuracy_counts_exactly():
    class Fixed(torch.nn.Module):  # predicts class = first input feature
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 3).float()

    x = torch.tensor([[0.0], [1.0], [2.0], [2.0]])
    y = torch.tensor([0, 1, 1, 2])
    assert zoo.accuracy(Fixed(), (x, y), batch_size=3) == pytest.approx(75.0)
    assert zoo.accuracy(Fixed(), []) == 0.0


def test_pretrained_digits_cached_and_reloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    rng_before = torch.random.get_rng_state()
    m1 = zoo.pretrained("digits_cnn")
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    path = zoo.pretrained_path("digits_cnn")
    assert path.parent == tmp_path / "models" and path.name.startswith("digits_cnn-")
    assert path.suffix == ".safetensors" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind
    mtime = path.stat().st_mtime_ns
    m2 = zoo.pretrained("digits_cnn")
    assert path.stat().st_mtime_ns == mtime  # loaded, not retrained
    assert m2 is not m1 and not m1.training and not m2.training
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert zoo.accuracy(m2, datasets.digits("test")) >= 95.0
    with torch.no_grad():  # instances are independent
        m2.fc1.weight.zero_()
    assert not torch.equal(m1.fc1.weight, m2.fc1.weight)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [path.name]


def test_pretrained_corrupt_cache_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    path = zoo.pretrained_path("digits_cnn")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="retraining digits_cnn"):
        model = zoo.pretrained("digits_cnn")
    assert zoo.accuracy(model, datasets.digits("test")) >= 95.0
    assert path.stat().st_size > 100_000


def test_pretrained_unknown_name():
    with pytest.raises(ValueError, match="fashion_cnn"):
        zoo.pretrained("resnet50")


def test_mean_pool_ignores_padding_and_normalizes():
    hidden = torch.tensor([[[3.0, 0.0], [1.0, 4.0], [100.0, 100.0]]])  # the third token is padding
    mask = torch.tensor([[1, 1, 0]])
    got = zoo.mean_pool(hidden, mask)  # mean (2, 2) -> normalized (0.7071, 0.7071)
    assert torch.allclose(got, torch.tensor([[2 ** -0.5, 2 ** -0.5]]))
    assert torch.equal(zoo.mean_pool(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long)), torch.zeros(1, 3))
