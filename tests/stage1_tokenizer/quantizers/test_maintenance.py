"""Codebook maintenance: every replacement policy revives dead codes; k-means init; event counting."""
import pytest
import torch

from stage1_tokenizer.quantizers import build_quantizer
from stage1_tokenizer.quantizers.maintenance import kmeans
from tests.helpers import brute_nearest, flat

K, D = 16, 2


def data_batch(n=2048):
    return (torch.rand(1, D, 1, n) * 2 - 1)  # uniform on [-1, 1]^2, as a (B, D, H, W) latent map


def half_dead(name, **opts):
    """A codebook whose second half sits far outside the data, so only half the codes can be selected."""
    q = build_quantizer(name, K, D, **opts)
    codes = torch.cat([torch.rand(K // 2, D) * 2 - 1, torch.full((K // 2, D), 50.0)])
    q._write_codes(torch.arange(K), codes)
    return q


def train(q, steps, lr=0.1):
    opt = torch.optim.SGD([p for p in q.parameters() if p.requires_grad], lr=lr) if any(
        p.requires_grad for p in q.parameters()) else None
    events = 0
    for _ in range(steps):
        out = q(data_batch())
        events += out.stats["replaced"]
        if opt is not None:
            opt.zero_grad()
            (out.quantized.square().mean() * 0 + out.loss).backward()
            opt.step()
    return events


def eval_usage(q):
    q.eval()
    with torch.no_grad():
        return q(data_batch(20000)).stats["usage"]


@pytest.mark.parametrize("policy", ["importance", "random-used", "reservoir"])
@pytest.mark.parametrize("name", ["vq", "ema"])
def test_each_policy_revives_dead_codes(name, policy):
    q = half_dead(name, replacement=policy, replace_every=10)
    events = train(q, 120)
    assert events >= K // 2  # at least the far half was replaced, and counted
    assert q.maintenance.replaced_total.item() == events
    assert eval_usage(q) == 1.0


@pytest.mark.parametrize("name", ["vq", "ema"])
def test_without_replacement_the_far_half_stays_dead(name):
    q = half_dead(name, replacement="none")
    assert train(q, 60) == 0
    assert eval_usage(q) <= 0.5


def test_importance_replacement_draws_in_proportion_to_usage():
    q = build_quantizer("vq", 4, 1, replacement="importance", replace_every=1, replace_noise=0.0)
    q.codebook.data = torch.tensor([[0.0], [10.0], [100.0], [1000.0]])
    q.maintenance.steps_selected.copy_(torch.tensor([3.0, 1.0, 0.0, 0.0]))  # u = (0.75, 0.25, 0, 0)
    q.maintenance.window_steps.fill_(4)
    torch.manual_seed(0)
    picks = []
    for _ in range(400):
        q.codebook.data[2:] = torch.tensor([[100.0], [1000.0]])
        q.maintenance._replace(q)
        picks += q.codebook.data[2:, 0].tolist()
        q.maintenance.steps_selected.copy_(torch.tensor([3.0, 1.0, 0.0, 0.0]))
        q.maintenance.window_steps.fill_(4)
    share0 = sum(p == 0.0 for p in picks) / len(picks)
    assert set(picks) <= {0.0, 10.0} and share0 == pytest.approx(0.75, abs=0.05)


def test_importance_threshold_and_until():
    q = build_quantizer("vq", 4, 1, replacement="importance", replace_every=100, replace_until=100)
    q.maintenance.steps_selected.copy_(torch.tensor([100.0, 50.0, 0.5, 0.0]))
    q.maintenance.window_steps.fill_(100)
    assert q.maintenance.dead_codes().tolist() == [False, False, True, True]  # u < 0.01 is dead
    for _ in range(100):
        q(torch.randn(1, 1, 2, 2))
    assert not bool(q.maintenance.due)  # step 100 is not before replace_until: window reset, nothing due
    assert q.maintenance.window_steps.item() == 0


def test_random_used_honours_dead_threshold_and_keeps_the_last_2000_steps_quiet():
    """NSVQ 2022 as released: fewer than 10 of 1000 steps is dead; no replacement in the run's last 2000 steps."""
    q = build_quantizer("nsvq-noise", 4, 1)  # random-used by default
    m = q.maintenance
    assert (m.policy, m.every, m.dead_threshold, m.no_replace_last) == ("random-used", 1000, 0.01, 2000)
    m.steps_selected.copy_(torch.tensor([1000.0, 10.0, 9.0, 0.0]))
    m.window_steps.fill_(1000)
    assert m.dead_codes().tolist() == [False, False, True, True]
    m.total_steps = 10000
    assert m.replacement_allowed(8000) and not m.replacement_allowed(8001) and not m.replacement_allowed(9000)
    m.total_steps = None  # run length unknown (no trainer): only replace_until limits it
    assert m.replacement_allowed(9000)
    quiet = build_quantizer("vq", 4, 1, replacement="random-used", replace_every=5, no_replace_last=10)
    quiet.maintenance.total_steps = 20
    for _ in range(20):
        quiet(torch.randn(1, 1, 2, 2) * 0.01)
        if int(quiet.maintenance.step) == 15:
            assert not bool(quiet.maintenance.due) and quiet.maintenance.window_steps.item() == 0
    assert quiet.maintenance.replaced_total.item() > 0  # replaced at step 5 and 10 only
    assert build_quantizer("vq", 4, 1, replacement="importance").maintenance.no_replace_last == 0


def test_replacement_waits_for_the_next_forward_and_keeps_autograd_intact():
    q = half_dead("diveq", replace_every=1)
    out = q(data_batch())
    assert bool(q.maintenance.due) and out.stats["replaced"] == 0
    out.quantized.sum().backward()  # nothing was modified in place under autograd
    out2 = q(data_batch())
    assert out2.stats["replaced"] == K // 2 and (q.codebook.detach()[K // 2:].abs() < 5).all()


def test_kmeans_init_sets_the_codebook_from_the_first_batch():
    q = build_quantizer("vq", K, D, kmeans_init=True, kmeans_iters=5)
    z = data_batch(4096)
    torch.manual_seed(1)
    q(z)
    torch.manual_seed(1)
    ref = kmeans(flat(z), K, 5)
    torch.testing.assert_close(q.codebook.detach(), ref)
    assert bool(q.maintenance.initialized)
    assert eval_usage(q) == 1.0


def test_kmeans_reduces_distortion_below_random_rows():
    x = torch.randn(3000, 2)
    torch.manual_seed(0)
    start = x[torch.randint(3000, (8,))]
    centres = kmeans(x, 8, 10)
    err = lambda c: (x - c[brute_nearest(x, c)]).square().sum(1).mean()
    assert err(centres) < 0.8 * err(start)


def test_simvq_reservoir_maps_latents_through_the_inverse_map():
    q = build_quantizer("simvq", 4, 3, replacement="reservoir", replace_every=1, bias=True)
    z = torch.randn(5, 3)
    base = q._to_code_space(z)
    torch.testing.assert_close(q.proj(base), z, atol=1e-4, rtol=1e-4)
