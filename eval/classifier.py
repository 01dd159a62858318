"""Class consistency of conditional samples: the fraction a classifier of the data assigns to the label they were
generated for. The classifier is a small CNN trained once per machine on the data's training split (its test
accuracy stored beside its weights, reported with every score) and cached under ``user_cache_dir("classifier")``."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from common.atomic import write_atomic
from common.cache_dir import user_cache_dir


def small_cnn(channels: int, num_classes: int) -> nn.Module:
    """Two conv blocks and a linear head (its MNIST test accuracy is recorded beside the cached weights)."""
    return nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, num_classes))


EPOCHS = 3  # one epoch reached 97.1% on MNIST at 32 px; the judge of a 95% target should err less than that


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = EPOCHS, batch_size: int = 128,
                     seed: int = 0) -> nn.Module:
    """A :func:`small_cnn` trained on ``images`` in [-1, 1] (N, C, H, W) with Adam, seeded."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = small_cnn(images.shape[1], int(labels.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted classes of images in [-1, 1]."""
    return torch.cat([model(chunk).argmax(1) for chunk in images.split(batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (predict(model, images) == labels).float().mean().item()


Split = tuple[torch.Tensor, torch.Tensor]  # images in [-1, 1] (N, C, H, W), labels (N,)


def cached_classifier(name: str, fingerprint: str, load: Callable[[], tuple[Split, Split]],
                      cache_dir: str | Path | None = None) -> tuple[nn.Module, float]:
    """(classifier, its test accuracy) for data ``name`` whose training content ``fingerprint`` names (the caller's
    hash, as the FID cache's): read from the cache, or trained on ``load()``'s (train, test) splits, tested and
    cached; the data is loaded only when nothing is cached."""
    root = Path(cache_dir) if cache_dir is not None else user_cache_dir("classifier")
    key = f"{name}-e{EPOCHS}-{fingerprint[:16]}"
    weights, info = root / f"{key}.safetensors", root / f"{key}.json"
    if weights.exists() and info.exists():
        facts = json.loads(info.read_text())
        model = small_cnn(facts["channels"], facts["num_classes"])
        model.load_state_dict(load_file(weights))
        return model.eval(), facts["test_accuracy"]
    train, test = load()
    model = train_classifier(*train)
    acc = accuracy(model, *test)
    root.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    write_atomic(info, json.dumps({"test_accuracy": acc, "train_images": len(train[0]), "test_images": len(test[0]),
                                   "channels": train[0].shape[1], "num_classes": int(train[1].max()) + 1}))
    return model, acc


def class_consistency(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` (in [0, 1]) the classifier assigns to ``labels``."""
    return accuracy(model, images * 2 - 1, labels)
