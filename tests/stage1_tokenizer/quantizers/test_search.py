"""The shared chunked nearest-code search equals brute force and holds bounded blocks."""
import pytest
import torch

from stage1_tokenizer.quantizers import search
from stage1_tokenizer.quantizers.search import nearest_code
from tests.helpers import brute_nearest


@pytest.mark.parametrize("k", [1, 7, 1024, 65536])
@pytest.mark.parametrize("max_elements", [64, 1 << 14, 1 << 22])
def test_chunked_search_equals_brute_force(k, max_elements):
    n, d = (96, 4) if k == 65536 else (300, 8)
    z, codebook = torch.randn(n, d), torch.randn(k, d)
    idx, dist = nearest_code(z, codebook, max_elements)
    ref = brute_nearest(z, codebook)
    ref_dist = ((z - codebook[ref]) ** 2).sum(1)
    # distances agree, and any index disagreement is a float near-tie with the same distance
    torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-4)
    mismatch = idx != ref
    assert mismatch.float().mean() < 0.01
    torch.testing.assert_close(((z - codebook[idx]) ** 2).sum(1)[mismatch], ref_dist[mismatch], rtol=1e-4, atol=1e-4)


def test_ties_go_to_lowest_index_across_code_blocks():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    for max_elements in (1, 2, 3, 100):  # blocks of one code, two codes, ... : the earlier block must win
        idx, _ = nearest_code(z, codebook, max_elements)
        assert idx.tolist() == [0, 1, 0]


def test_search_blocks_stay_bounded(monkeypatch):
    """Measure the largest distance block allocated: never more than max_elements, never N x K."""
    seen = []
    real_addmm = torch.addmm

    def recording_addmm(inp, a, b, **kw):
        out = real_addmm(inp, a, b, **kw)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(search.torch, "addmm", recording_addmm)
    n, k, budget = 4096, 65536, 1 << 16
    nearest_code(torch.randn(n, 4), torch.randn(k, 4), budget)
    assert seen and max(seen) <= budget < n * k
    assert sum(seen) == n * k  # every distance computed exactly once


def test_search_rejects_bad_shapes():
    with pytest.raises(ValueError, match="codebook"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError):
        nearest_code(torch.randn(3, 4, 1), torch.randn(5, 4))


def _with_plan(monkeypatch, plan):
    monkeypatch.setattr(search, "search_plan", plan)


def _merged_plan(device, n, k, max_elements):
    """The GPU plan (every block's argmin merged) with the default block sizes, run on CPU."""
    return (*search.block_sizes(n, k, max_elements), search._merged_min)


@pytest.mark.parametrize("max_elements", [1 << 10, 1 << 16, 1 << 22])
def test_cpu_tiles_and_gpu_blocks_pick_identical_indices_ties_included(monkeypatch, max_elements):
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(5000, 16, generator=g)  # K not a multiple of the 512-code tile
    codebook[3000:3100] = codebook[100:200]  # exact duplicates four tiles later
    codebook[4999] = codebook[7]  # and in the last, partial tile
    z = torch.cat([codebook[100:200], codebook[7:8], torch.randn(3000, 16, generator=g)])
    tiled, tiled_dist = nearest_code(z, codebook, max_elements)
    _with_plan(monkeypatch, _merged_plan)
    merged, merged_dist = nearest_code(z, codebook, max_elements)
    assert torch.equal(tiled, merged)
    torch.testing.assert_close(tiled_dist, merged_dist)  # other block shapes: other GEMM rounding
    assert tiled[:100].tolist() == list(range(100, 200)) and int(tiled[100]) == 7  # the lower duplicate
    assert torch.equal(tiled[101:], brute_nearest(z[101:], codebook))


def test_every_variant_picks_the_same_indices_with_either_search(monkeypatch):
    """The CPU tiling is a speed change only: each variant's training step selects the same codes as with the
    GPU plan (the search as it was before the tiling)."""
    from stage1_tokenizer.quantizers import QUANTIZERS, build_quantizer

    z = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    picked = {}
    for plan in (search.search_plan, _merged_plan):
        _with_plan(monkeypatch, plan)
        for name in QUANTIZERS:
            torch.manual_seed(0)
            q = build_quantizer(name, 1024, 8)
            picked.setdefault(name, []).append(q(z).indices)
    for name, (tiled, merged) in picked.items():
        assert torch.equal(tiled, merged), name
