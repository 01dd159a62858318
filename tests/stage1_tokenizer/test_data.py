"""Data sources' content fingerprints: what a cache of features computed from them depends on."""
from __future__ import annotations

import torch

from stage1_tokenizer.data import build_dataset, class_names, content_fingerprint
from tests.stage1_tokenizer.test_data_fit import _folder


def test_a_folders_fingerprint_follows_the_selected_images_and_their_preprocessing(tmp_path):
    _folder(tmp_path / "set" / "train", 4, (16, 16), True)
    _folder(tmp_path / "set" / "test", 2, (16, 16), True, start=50)
    fp = content_fingerprint(build_dataset(str(tmp_path / "set"), 16, 3, "train", 3))
    assert content_fingerprint(build_dataset(str(tmp_path / "set"), 16, 3, "train", 3)) == fp
    assert content_fingerprint(build_dataset(str(tmp_path / "set"), 16, 3, "train", 4)) != fp  # another selection
    assert content_fingerprint(build_dataset(str(tmp_path / "set"), 32, 3, "train", 3)) != fp  # another resize
    assert content_fingerprint(build_dataset(str(tmp_path / "set"), 16, 1, "train", 3)) != fp  # grey
    _folder(tmp_path / "set" / "test", 2, (16, 16), True, start=70)  # held-out images: not in the selection
    _folder(tmp_path / "set" / "train", 1, (16, 16), True, start=3)  # the fourth training image: not selected
    assert content_fingerprint(build_dataset(str(tmp_path / "set"), 16, 3, "train", 3)) == fp
    _folder(tmp_path / "set" / "train", 1, (16, 16), True, start=1)  # the second one rewritten with other pixels
    assert content_fingerprint(build_dataset(str(tmp_path / "set"), 16, 3, "train", 3)) != fp


def test_in_memory_and_procedural_sources_fingerprint_their_images():
    mnist = content_fingerprint(build_dataset("mnist", 32, 1, "train", 100))
    assert mnist == content_fingerprint(build_dataset("mnist", 32, 1, "train", 100))
    assert mnist != content_fingerprint(build_dataset("mnist", 32, 1, "test", 100))
    assert mnist != content_fingerprint(build_dataset("mnist", 28, 1, "train", 100))
    shapes = content_fingerprint(build_dataset("shapes", 16, 3, "train", 20))
    assert shapes != content_fingerprint(build_dataset("shapes", 16, 3, "test", 20))
    assert shapes != content_fingerprint(build_dataset("shapes", 16, 3, "train", 21))


def test_mnist_transformed_once_equals_the_transform_image_by_image():
    """The in-memory set's one batched transform against torchvision's transform of each image alone."""
    from stage1_tokenizer.data import image_transform, load_mnist, match_channels

    x, y = load_mnist("test")
    per_image = image_transform(32)
    for channels in (1, 3):
        ds = build_dataset("mnist", 32, channels, "test")
        for i in (0, 17, len(x) - 1):
            image, label = ds[i]
            assert torch.equal(image, match_channels(per_image(x[i]), channels)) and label == int(y[i])
    crops = build_dataset("mnist", 32, 1, "test", random_crop=True)
    assert not torch.equal(crops[0][0], crops[0][0]), "random crops are drawn per access, not precomputed"


def test_an_image_folder_layout_gives_labels_and_class_names(tmp_path):
    """torchvision's ImageFolder layout: one subfolder per class, sorted; the train/ and test/ splits share the
    class list even where a split lacks a class; any other layout has no labels."""
    for split, classes in (("train", ("cat", "dog", "owl")), ("test", ("cat", "owl"))):
        for k, name in enumerate(classes):
            _folder(tmp_path / "pets" / split / name, 2, (8, 8), True, start=10 * k)
    train = build_dataset(str(tmp_path / "pets"), 8, 3, "train")
    test = build_dataset(str(tmp_path / "pets"), 8, 3, "test")
    assert class_names(train) == class_names(test) == ["cat", "dog", "owl"]
    assert [train[i][1] for i in range(len(train))] == [0, 0, 1, 1, 2, 2]
    assert [test[i][1] for i in range(len(test))] == [0, 0, 2, 2]
    _folder(tmp_path / "flat", 4, (8, 8), True)
    _folder(tmp_path / "flat" / "extra", 2, (8, 8), True)  # images at two depths: not a class layout
    flat = build_dataset(str(tmp_path / "flat"), 8, 3, "train", holdout=0.0)
    assert class_names(flat) == [] and {flat[i][1] for i in range(len(flat))} == {-1}
    assert class_names(build_dataset("mnist", 32, 1, "test", 4)) == [str(d) for d in range(10)]
