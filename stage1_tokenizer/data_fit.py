"""The tokenizer's input fitted to the data: channels, resolution and depth read off a sample of its images.

The rule (docs/methods.md, "Input shape"): colour when any sampled image has colour after decoding, else grey; the
resolution is the standard size nearest the images' median shorter side on a log scale (larger images are resized
to 256 px, and the line says so); the downsampling blocks give 8x8 tokens at 32-64 px and 16x16 at 128-256 px.
What the user typed (a named preset or config, a ``model.*`` override) is kept; where it contradicts the data,
one line names what is lost and the option that keeps it.
"""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .config import TokenizerConfig
from .data import SIXTEEN_BIT, decode, has_alpha, image_files, load_mnist, split_folders

STANDARD_SIZES = (32, 64, 128, 256)
SAMPLE = 256  # images looked at, evenly spaced over the source
GREY_SPREAD = 12  # largest channel spread (of 255) still grey: JPEG chroma noise on grey images
SHAPE_FIELDS = ("in_channels", "resolution", "block_out_channels")  # model.* keys the fit may set


@dataclass
class DataProfile:
    """What a sample of a source's images looks like after decoding (counts are over the sampled images)."""

    source: str
    images: int  # in the source's training split
    sampled: int
    colour: int  # with colour after decoding (the rest are grey)
    short_min: int
    short_median: int
    short_max: int
    sizes: int  # distinct width x height
    non_square: int
    alpha: int  # with transparency, composited on white
    palette: int
    sixteen_bit: int
    unreadable: int = 0

    def describe(self) -> str:
        """``data/emoji: 3,050 images (256 sampled): colour, 64 px, 256 with transparency (composited on white)``."""
        kind = "colour" if self.colour == self.sampled else "grey" if not self.colour else \
            f"colour ({self.colour} colour, {self.sampled - self.colour} grey)"
        size = f"{self.short_median} px" if self.sizes == 1 else \
            f"{self.sizes} sizes (shorter side {self.short_min}-{self.short_max} px, median {self.short_median})"
        extras = [f"{n} {what}" for n, what in (
            (self.non_square, "non-square (centre-cropped)"), (self.alpha, "with transparency (composited on white)"),
            (self.palette, "palette (expanded)"), (self.sixteen_bit, "16-bit (scaled to 8 bits)"),
            (self.unreadable, "unreadable (skipped)")) if n]
        seen = "all looked at" if self.sampled == self.images else f"{self.sampled} sampled"
        return f"{self.source}: {self.images:,} images ({seen}): {', '.join([kind, size, *extras])}"


def _look(img: Image.Image) -> tuple[int, int, bool, bool, bool, bool]:
    """(width, height, colour, alpha, palette, 16-bit) of one image."""
    small = decode(img, 3)
    small.thumbnail((64, 64))
    pixels = np.asarray(small, dtype=np.int16)
    colour = bool((pixels.max(axis=2) - pixels.min(axis=2)).max() > GREY_SPREAD)
    return img.width, img.height, colour, has_alpha(img), img.mode in ("P", "PA"), img.mode in SIXTEEN_BIT


def _profile(source: str, total: int, looks: list, unreadable: int) -> DataProfile:
    if not looks:
        raise ValueError(f"none of the {unreadable} sampled images of {source} could be decoded")
    shorts = [min(w, h) for w, h, *_ in looks]
    return DataProfile(source, total, len(looks), sum(x[2] for x in looks), min(shorts),
                       int(statistics.median_low(shorts)), max(shorts), len({(w, h) for w, h, *_ in looks}),
                       sum(w != h for w, h, *_ in looks), sum(x[3] for x in looks), sum(x[4] for x in looks),
                       sum(x[5] for x in looks), unreadable)


def _spaced(n: int, sample: int) -> list[int]:
    """``sample`` indices evenly spaced over ``range(n)`` (all of them when fewer)."""
    return list(range(n)) if n <= sample else [round(i * (n - 1) / (sample - 1)) for i in range(sample)]


def inspect_data(source: str, sample: int = SAMPLE) -> DataProfile | None:
    """The profile of ``source``'s training images; None for ``shapes``, which are drawn at any size in colour."""
    if source == "shapes":
        return None
    if source == "mnist":
        x, _ = load_mnist("train")
        n, _, h, w = x.shape
        return DataProfile(source, n, n, 0, min(h, w), min(h, w), min(h, w), 1, int(h != w), 0, 0, 0)
    looks, unreadable = [], 0
    if source.startswith("hf:"):
        import datasets

        rows = datasets.load_dataset("imagefolder", data_dir=source[3:])
        rows = rows["train"] if "train" in rows else next(iter(rows.values()))
        for i in _spaced(len(rows), sample):
            looks.append(_look(rows[i]["image"]))
        return _profile(source, len(rows), looks, 0)
    root = Path(source)
    if not root.is_dir():
        return None  # build_dataset names the bad source
    files = image_files(root / "train" if split_folders(root) else root)
    if not files:
        return None  # build_dataset says no images were found
    for i in _spaced(len(files), sample):
        try:
            with Image.open(files[i]) as img:
                img.load()
                looks.append(_look(img))
        except Exception:  # PIL raises many types for corrupt files; the dataset names each one
            unreadable += 1
    return _profile(source, len(files), looks, unreadable)


def standard_resolution(short_side: int) -> int:
    """The standard size nearest ``short_side`` on a log scale, ties to the larger."""
    return min(STANDARD_SIZES, key=lambda s: (abs(math.log2(s / short_side)), -s))


def downsampling_blocks(resolution: int) -> int:
    """Blocks that halve the image: 8x8 tokens at up to 64 px, 16x16 above; never a factor that does not divide."""
    tokens = 8 if resolution <= 64 else 16
    blocks = max(0, int(math.log2(max(1, resolution // tokens))))
    while resolution % 2 ** blocks:
        blocks -= 1
    return blocks


def with_depth(widths: list[int], blocks: int) -> list[int]:
    """``block_out_channels`` with ``blocks`` downsamplings: cut from the end, or the last width repeated."""
    n = blocks + 1
    return list(widths[:n]) if len(widths) >= n else [*widths, *[widths[-1]] * (n - len(widths))]


def typed_fields(overrides: list[str], named: str | None) -> dict[str, str]:
    """{shape field: what the user typed that set it}: every field when a preset or config was named, and each
    ``model.<field>=`` override (which names itself)."""
    typed = dict.fromkeys(SHAPE_FIELDS, named) if named else {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model.") and key[6:] in SHAPE_FIELDS:
            typed[key[6:]] = item
    return typed


def fit_to_data(cfg: TokenizerConfig, profile: DataProfile | None, typed: dict[str, str]) -> tuple[TokenizerConfig, dict | None]:
    """``cfg`` with the shape fields the user did not type taken from the data, and the record of the choice
    (for the console, run.json and the report); ``(cfg, None)`` for sources without a profile."""
    if profile is None:
        return cfg, None
    m = cfg.model
    data_channels = 3 if profile.colour else 1
    data_resolution = standard_resolution(profile.short_median)
    channels = m.in_channels if "in_channels" in typed else data_channels
    resolution = m.resolution if "resolution" in typed else data_resolution
    widths = m.block_out_channels if "block_out_channels" in typed else with_depth(
        m.block_out_channels, downsampling_blocks(resolution))
    cfg = replace(cfg, model=replace(m, in_channels=channels, resolution=resolution, block_out_channels=widths))
    lost = []
    if channels == 1 and profile.colour:
        lost.append(f"{profile.colour} of {profile.sampled} sampled images are colour and train as grey "
                    f"({typed['in_channels']}); model.in_channels=3 keeps colour")
    if channels == 3 and not profile.colour:
        lost.append(f"the images are grey and train as 3 equal channels ({typed['in_channels']}): 3x the input work "
                    f"for nothing; model.in_channels=1 fits them")
    crops = cfg.data.random_resized_crop
    if resolution < profile.short_median and not crops:
        why = f" ({typed['resolution']})" if "resolution" in typed else ""
        lost.append(f"images of {profile.short_median} px are resized to {resolution} px{why}, keeping "
                    f"{100 * (resolution / profile.short_median) ** 2:.0f}% of their pixels; "
                    f"model.resolution={profile.short_median} keeps them")
    elif "resolution" in typed and resolution > 2 * profile.short_median:
        lost.append(f"images of {profile.short_median} px are upsampled to {resolution} px ({typed['resolution']}): "
                    f"{(resolution / data_resolution) ** 2:.0f}x the work, no more detail; "
                    f"model.resolution={data_resolution} fits them")
    grid = resolution // 2 ** (len(widths) - 1)
    how = "random-resized crops" if crops else "resolution"
    chosen = (f"tokenizer in_channels={channels}, {how} {resolution} px, {len(widths) - 1} downsampling blocks "
              f"({grid}x{grid} tokens)")
    typed_here = sorted(set(typed.values()))
    chosen += f" (kept from {', '.join(typed_here)})" if typed_here else " (from the data)"
    message = f"{profile.describe()} -> {chosen}" + (f". WARNING: {'; '.join(lost)}" if lost else "")
    record = {"profile": asdict(profile), "in_channels": channels, "resolution": resolution,
              "block_out_channels": widths, "tokens": grid, "random_resized_crop": crops,
              "from": {f: typed.get(f, "data") for f in SHAPE_FIELDS}, "warnings": lost, "message": message}
    return cfg, record


def announce(fit: dict | None) -> None:
    """The fit's one line on stderr, from the main process only (nothing for sources without a profile)."""
    from common.runtime import process_state

    if fit and process_state().is_main_process:
        print(f"vqgen: data {fit['message']}", file=sys.stderr)
