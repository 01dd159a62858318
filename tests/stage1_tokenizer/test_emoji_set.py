"""The emoji set's builder: checked tarballs, one image per emoji and style, a split that never separates an emoji."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile

import pytest
from PIL import Image

from stage1_tokenizer import emoji_set
from stage1_tokenizer.data import build_dataset

ENTRIES = [  # (unified, category, image file, in twitter)
    ("1F600", "Smileys & Emotion", "1f600.png", True),
    ("1F1EA-1F1EC", "Flags", "1f1ea-1f1ec.png", True),
    ("1F3FB", "Component", "1f3fb.png", True),
    ("1F9A9", "Animals & Nature", "1f9a9.png", False),
] + [(f"2{i:04X}", "Objects", f"2{i:04x}.png", True) for i in range(40)]


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (64, 64), colour).save(buf, "PNG")
    return buf.getvalue()


def _tarball(folder, style: str) -> str:
    """A tarball laid out as the npm package: package/emoji.json and package/img/<style>/64/*.png."""
    package = emoji_set.STYLES[style][0]
    path = folder / f"{package}-{emoji_set.VERSION}.tgz"
    meta = [{"unified": u, "category": c, "image": img, "has_img_google": True, "has_img_twitter": tw}
            for u, c, img, tw in ENTRIES]
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("package/emoji.json", json.dumps(meta).encode()),
                           *((f"package/img/{style}/64/{img}", _png((i, 0, 0, 255)))
                             for i, (_, _, img, tw) in enumerate(ENTRIES) if style == "google" or tw)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


@pytest.fixture
def tarballs(tmp_path, monkeypatch):
    folder = tmp_path / "npm"
    folder.mkdir()
    styles = {style: (package, _tarball(folder, style), licence)
              for style, (package, _, licence) in emoji_set.STYLES.items()}
    monkeypatch.setattr(emoji_set, "STYLES", styles)
    return folder


def test_builds_one_image_per_emoji_and_style_split_by_emoji(tarballs, tmp_path):
    counts = emoji_set.prepare_emoji(tarballs, tmp_path / "emoji")
    files = sorted((tmp_path / "emoji").rglob("*.png"))
    # 43 pictures (the Component swatch left out) in google, 42 in twitter (one emoji has no twitter image)
    assert counts["train"] + counts["test"] == len(files) == 43 + 42
    assert not any("1f3fb" in f.name for f in files)
    sides = {}
    for f in files:
        split, category = f.relative_to(tmp_path / "emoji").parts[:2]
        sides.setdefault(f.stem.split("-", 1)[1], set()).add(split)
        assert category in {"smileys-emotion", "flags", "animals-nature", "objects"}
    assert all(len(s) == 1 for s in sides.values())  # both styles of an emoji on one side
    assert 0 < counts["test"] < counts["train"]
    assert "Apache License 2.0" in (tmp_path / "emoji" / "LICENSES.md").read_text()
    assert len(build_dataset(str(tmp_path / "emoji"), 64, 3, "test")) == counts["test"]
    with pytest.raises(FileExistsError):
        emoji_set.prepare_emoji(tarballs, tmp_path / "emoji")


def test_missing_or_altered_tarball_is_named_with_the_command_that_fetches_it(tarballs, tmp_path):
    google = tarballs / f"emoji-datasource-google-{emoji_set.VERSION}.tgz"
    google.write_bytes(google.read_bytes() + b"x")
    with pytest.raises(ValueError, match="does not match the registry"):
        emoji_set.prepare_emoji(tarballs, tmp_path / "a")
    google.unlink()
    with pytest.raises(FileNotFoundError, match=f"npm pack emoji-datasource-google@{emoji_set.VERSION}"):
        emoji_set.prepare_emoji(tarballs, tmp_path / "b")
    assert not list(tmp_path.glob("*a")) and not list(tmp_path.glob("*b"))  # nothing half-written


def test_held_out_fraction_is_the_holdout():
    codes = [f"{i:05X}" for i in range(20000)]
    assert sum(map(emoji_set.held_out, codes)) / len(codes) == pytest.approx(emoji_set.HOLDOUT, abs=0.01)
