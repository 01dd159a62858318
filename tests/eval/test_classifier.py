"""Class consistency: a classifier trained once and cached, scoring samples against the labels they were made for."""
import torch

from eval.classifier import cached_classifier, class_consistency


def _halves(n: int, seed: int):
    """Images in [-1, 1] lit on the left half (class 0) or the right half (class 1), plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.full((n, 1, 8, 8), -1.0)
    for i, y in enumerate(labels.tolist()):
        images[i, :, :, 4 * y:4 * y + 4] = 1.0
    return (images + 0.3 * torch.randn(images.shape, generator=g)).clamp(-1, 1), labels


def test_class_consistency_on_a_constructed_case_and_the_cache(tmp_path):
    model, acc = cached_classifier("halves", "seeds-0-1", lambda: (_halves(600, 0), _halves(200, 1)), tmp_path)
    assert acc > 0.95
    images, labels = _halves(100, 2)
    as_samples = (images + 1) / 2  # samples arrive in [0, 1]
    assert class_consistency(model, as_samples, labels) > 0.95
    assert class_consistency(model, as_samples, 1 - labels) < 0.05  # generated for the other class
    def refuse():
        raise AssertionError("a cached classifier loads no data")
    again, acc2 = cached_classifier("halves", "seeds-0-1", refuse, tmp_path)  # read, not retrained
    assert acc2 == acc and len(list(tmp_path.glob("*.safetensors"))) == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
