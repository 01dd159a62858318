"""FSQ, LFQ, BSQ and IBQ against plain-tensor computations of their rules (docs/methods.md)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from stage1_tokenizer.quantizers import build_quantizer, nearest_code
from stage1_tokenizer.quantizers.bsq import entropy_weight
from stage1_tokenizer.quantizers.entropy import group_batch_entropy, mean_code_distribution
from stage1_tokenizer.quantizers.fsq import levels_for


def flat(z):
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def as_image(x):
    """(N, d) -> (N, d, 1, 1)."""
    return x[:, :, None, None]


def plain_entropy(p, eps):
    return -(p * (p + eps).log()).sum(-1)


def all_signs(d):
    """Every {-1, 1}^d vector, row i holding the bits of i little-endian."""
    return torch.tensor([[1.0 if (i >> j) & 1 else -1.0 for j in range(d)] for i in range(2 ** d)])


# --- FSQ ---------------------------------------------------------------------------------------------
def test_fsq_notebook_example():
    """The FSQ authors' notebook: levels [3, 5, 4], x = [0.25, 0.6, -7] -> [0, 0.5, -1], index 10."""
    q = build_quantizer("fsq", 60, 3, levels=[3, 5, 4]).eval()
    out = q(as_image(torch.tensor([[0.25, 0.6, -7.0]])))
    assert out.quantized.flatten().tolist() == [0.0, 0.5, -1.0]
    assert out.indices.item() == 10


@pytest.mark.parametrize("bound", ["tanh", "atanh", "ifsq"])
def test_fsq_bound_is_the_written_formula(bound):
    levels = [3, 5, 7] if bound == "ifsq" else [8, 5, 4]
    q = build_quantizer("fsq", math.prod(levels), 3, levels=levels, **({"ifsq": True} if bound == "ifsq" else {"bound": bound}))
    x = torch.randn(50, 3) * 3
    expect = torch.empty_like(x)
    for j, L in enumerate(levels):
        o = 0.5 if L % 2 == 0 else 0.0
        if bound == "tanh":
            h = (L - 1) * (1 - 1e-3) / 2
            expect[:, j] = torch.tanh(x[:, j] + math.tan(o / h)) * h - o
        elif bound == "atanh":
            h = (L - 1) * (1 + 1e-3) / 2
            expect[:, j] = torch.tanh(x[:, j] + math.atanh(o / h)) * h - o
        else:
            expect[:, j] = torch.tanh(0.8 * x[:, j]) * (L - 1) / 2
    torch.testing.assert_close(q.bounded(x), expect)


def test_fsq_grid_digits_index_and_table():
    levels = [8, 5, 5, 5]
    q = build_quantizer("fsq", 1000, 4, levels=levels)
    x = torch.randn(500, 4) * 2
    out = q(as_image(x.clone().requires_grad_()))
    zhat, idx = flat(out.quantized), out.indices.flatten()
    half = torch.tensor([L // 2 for L in levels], dtype=torch.float32)
    digits = zhat * half + half
    assert torch.equal(digits, digits.round()) and (digits >= 0).all() and (digits < torch.tensor(levels)).all()
    expect_idx = sum(digits[:, j].long() * math.prod(levels[:j]) for j in range(4))  # first coordinate least significant
    assert torch.equal(idx, expect_idx)
    assert torch.equal(q.table[idx], zhat.detach())
    assert q.table.shape == (1000, 4) and len(torch.unique(q.table, dim=0)) == 1000
    assert q(as_image(torch.zeros(1, 4))).indices.item() == sum(L // 2 * math.prod(levels[:j]) for j, L in enumerate(levels))
    # the token is the nearest grid row to the bounded latent: the shared search agrees
    assert torch.equal(nearest_code(q.bounded(x) / half, q.table)[0], idx)


@pytest.mark.parametrize("opts", [{"bound": "tanh"}, {"bound": "atanh"}, {"ifsq": True}])
def test_fsq_inference_cell_edges_give_the_training_digits(opts):
    """Inference (and the export) finds digits by each coordinate's cell edges: the bound crosses r + 1/2 there,
    and the tokens equal the training rule's round(bound(x))."""
    levels = [5, 7, 3] if "ifsq" in opts else [8, 5, 6]
    q = build_quantizer("fsq", math.prod(levels), 3, levels=levels, **opts)
    for j, L in enumerate(levels):
        edges = q.edges[j, :L - 1]
        torch.testing.assert_close(q.bounded(edges[:, None].expand(-1, 3))[:, j],
                                   torch.arange(L - 1) - L // 2 + 0.5, rtol=0, atol=1e-4)
        assert torch.isinf(q.edges[j, L - 1:]).all()
    z = as_image(torch.randn(4000, 3) * 2)
    assert torch.equal(q(z).indices, q.eval()(z).indices)


def test_fsq_straight_through_gradient_is_the_bound_derivative():
    q = build_quantizer("fsq", 240, 3, levels=[8, 6, 5])
    x = torch.randn(20, 3, requires_grad=True)
    flat(q(as_image(x)).quantized).sum().backward()
    xr = x.detach().clone().requires_grad_()
    (q.bounded(xr) / (q.levels // 2)).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("num_codes,levels", [(256, [8, 6, 5]), (240, [8, 6, 5]), (1024, [8, 5, 5, 5]),
                                              (1000, [8, 5, 5, 5]), (4096, [7, 5, 5, 5, 5]),
                                              (2 ** 14, [8, 8, 8, 6, 5]), (2 ** 16, [8, 8, 8, 5, 5, 5])])
def test_fsq_levels_from_num_codes_follow_the_paper_table(num_codes, levels):
    assert levels_for(num_codes) == levels
    assert build_quantizer("fsq", num_codes, 8).num_codes == math.prod(levels)


@pytest.mark.parametrize("num_codes,opts,match", [(100, {}, "no paper levels"), (64, {"levels": [8, 5]}, "set num_codes=40"),
                                                  (16, {"levels": [2, 8]}, ">= 3"), (16, {"levels": [4, 4], "ifsq": True}, "odd"),
                                                  (16, {"levels": [4, 4], "bound": "sigmoid"}, "unknown fsq bound"),
                                                  (16, {"levels": [4, 4], "replacement": "importance"}, "fixed implicit"),
                                                  (16, {"levels": [4, 4], "beta": 0.5}, "unknown option")])
def test_fsq_bad_settings_are_clear_errors(num_codes, opts, match):
    with pytest.raises(ValueError, match=match):
        build_quantizer("fsq", num_codes, 8, **opts)


@pytest.mark.parametrize("dim", [4, 16])
def test_fsq_matches_vector_quantize_pytorch(dim):
    """Where the rules coincide (vector-quantize-pytorch's atanh bound) values and indices are equal; the
    projections are copied. Difference kept: vqgen's default bound is the authors' tanh(x + tan(o/h))."""
    lr = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    ref = lr.FSQ(levels=[8, 5, 5, 5], dim=dim)
    q = build_quantizer("fsq", 1000, dim, bound="atanh")
    if dim != 4:
        q.proj_in.load_state_dict(ref.project_in.state_dict())
        q.proj_out.load_state_dict(ref.project_out.state_dict())
    z = torch.randn(2, 6, dim) * 2
    ref_out, ref_idx = ref(z)
    out = q(z.permute(0, 2, 1)[..., None])
    torch.testing.assert_close(out.quantized[..., 0].permute(0, 2, 1), ref_out)
    assert torch.equal(out.indices[..., 0], ref_idx.long())


# --- LFQ ---------------------------------------------------------------------------------------------
def test_lfq_sign_index_and_loss_against_plain_tensors():
    d, T = 5, 0.01
    q = build_quantizer("lfq", 2 ** d, d)
    x = torch.randn(64, d) * 0.02
    out = q(as_image(x))
    sign = torch.where(x > 0, 1.0, -1.0)
    assert torch.equal(flat(out.quantized), sign)
    assert torch.equal(out.indices.flatten(), ((x > 0).long() * 2 ** torch.arange(d)).sum(1))  # little-endian
    codes = all_signs(d)
    p = torch.softmax(2 * x @ codes.T / T, dim=1)
    h_s = -(p * p.log()).sum(1).mean()
    h_b = plain_entropy(p.mean(0), 1e-5)
    torch.testing.assert_close(out.stats["entropy_sample"], h_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.stats["entropy_batch"], h_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, 0.1 * (h_s - h_b) + 0.25 * (x - sign).pow(2).mean(), rtol=1e-5, atol=1e-5)
    assert torch.equal(q.table, codes)  # C_i = 2 bits(i) - 1


def test_lfq_sign_is_the_nearest_code_with_ties_to_bit_zero():
    q = build_quantizer("lfq", 2 ** 6, 6).eval()
    x = torch.randn(200, 6)
    x[:5, 2] = 0.0
    assert torch.equal(q(as_image(x)).indices.flatten(), nearest_code(x, q.table)[0])


def test_lfq_grouped_batch_entropy_is_an_upper_bound_of_the_joint_one():
    q = build_quantizer("lfq", 2 ** 6, 6, entropy_group=2)
    x = torch.randn(300, 6) * 0.03 + torch.tensor([0.02, 0.02, 0.0, 0.0, -0.01, 0.01])
    a = 4 * x / 0.01
    grouped = sum(plain_entropy(torch.softmax(2 * x[:, g:g + 2] @ all_signs(2).T / 0.01, 1).mean(0), 1e-5) for g in (0, 2, 4))
    joint = plain_entropy(torch.softmax(2 * x @ all_signs(6).T / 0.01, 1).mean(0), 1e-5)
    torch.testing.assert_close(q.entropies(x)[1], grouped, rtol=1e-5, atol=1e-5)
    assert group_batch_entropy(a, 6, 1e-5) <= grouped + 1e-5
    torch.testing.assert_close(group_batch_entropy(a, 6, 1e-5), joint, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [1, 5, 12])
def test_batch_distribution_by_halves_equals_the_full_softmax_with_gradients(d):
    """The mean over tokens of the 2^d-way softmax, from the two halves' distributions by one matrix product:
    the same distribution (up to code order) and the same gradient as the full softmax."""
    x = (torch.randn(40, d, dtype=torch.float64) * 0.02).requires_grad_()  # float64: 4,096-way sums stay exact
    full = torch.softmax(2 * x @ all_signs(d).double().T / 0.01, 1).mean(0)
    halves = mean_code_distribution(4 * x / 0.01)
    torch.testing.assert_close(halves.sort().values, full.sort().values)
    gx = torch.autograd.grad(plain_entropy(full, 1e-5), x)[0]
    hx = torch.autograd.grad(plain_entropy(halves, 1e-5), x)[0]
    torch.testing.assert_close(hx, gx)


def test_lfq_matches_vector_quantize_pytorch():
    """Values equal; indices bit-reversed (vector-quantize-pytorch is big-endian, Open-MAGVIT2 and vqgen
    little-endian); entropies equal up to the eps forms (clamp at 1e-5 there, log(p + 1e-5) here)."""
    lr = pytest.importorskip("vector_quantize_pytorch")
    d = 6
    ref = lr.LFQ(dim=d, codebook_size=2 ** d, entropy_loss_weight=0.1, commitment_loss_weight=0.25)
    q = build_quantizer("lfq", 2 ** d, d)
    z = torch.randn(2, 50, d) * 0.01
    (ref_q, ref_idx, _), breakdown = ref(z, return_loss_breakdown=True)
    out = q(z.permute(0, 2, 1)[..., None])
    torch.testing.assert_close(out.quantized[..., 0].permute(0, 2, 1), ref_q)
    reversed_bits = sum(((ref_idx >> j) & 1) << (d - 1 - j) for j in range(d))
    assert torch.equal(out.indices[..., 0], reversed_bits.long())
    torch.testing.assert_close(out.stats["entropy_batch"], breakdown.batch_entropy, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.stats["entropy_sample"], breakdown.per_sample_entropy, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name,k", [("lfq", 100), ("bsq", 1), ("bsq", 48)])
def test_binary_quantizers_need_a_power_of_two(name, k):
    with pytest.raises(ValueError, match="2\\^d"):
        build_quantizer(name, k, 8)


# --- BSQ ---------------------------------------------------------------------------------------------
def test_bsq_unit_norm_values_and_big_endian_index():
    d = 6
    q = build_quantizer("bsq", 2 ** d, d)
    x = torch.randn(80, d)
    out = q(as_image(x))
    v, idx = flat(out.quantized), out.indices.flatten()
    torch.testing.assert_close(v.norm(dim=1), torch.ones(80))
    assert torch.equal(v, torch.where(x > 0, 1.0, -1.0) / math.sqrt(d))
    assert torch.equal(idx, ((x > 0).long() * 2 ** torch.arange(d - 1, -1, -1)).sum(1))
    assert torch.equal(q.table[idx], v)
    assert torch.equal(nearest_code(x, q.table)[0], idx)  # sign(x) is the nearest row: the shared search agrees


@pytest.mark.parametrize("scaled", [True, False])
def test_bsq_straight_through_gradient_scale(scaled):
    """dq/du = I/sqrt(d) as released; vector-quantize-pytorch's spherical form leaves it unscaled."""
    d = 8
    q = build_quantizer("bsq", 2 ** d, d, scaled_ste=scaled, entropy_weight=0.0)
    x = torch.randn(10, d, requires_grad=True)
    g = torch.randn(10, d)
    (flat(q(as_image(x)).quantized) * g).sum().backward()
    xr = x.detach().clone().requires_grad_()
    u = xr / xr.norm(dim=1, keepdim=True)
    ((u * g).sum() / (math.sqrt(d) if scaled else 1.0)).backward()
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("g", [1, 2, 3])
def test_bsq_entropies_and_loss_against_the_grouped_softmax(g):
    """Analytical H_s equals the grouped form sum_g H(softmax(2 tau u_g.c)); H_b the grouped batch entropy."""
    d, tau = 6, 1.0
    q = build_quantizer("bsq", 2 ** d, d, group_size=g, beta=0.5)
    x = torch.randn(120, d) + 0.3
    q.set_step(500)
    out = q(as_image(x))
    u = x / x.norm(dim=1, keepdim=True)
    codes = all_signs(g) / math.sqrt(d)
    probs = [torch.softmax(2 * tau * u[:, s:s + g] @ codes.T, 1) for s in range(0, d, g)]
    h_s = sum(plain_entropy(p, 1e-8) for p in probs).mean()
    h_b = sum(plain_entropy(p.mean(0), 1e-8) for p in probs)
    torch.testing.assert_close(out.stats["entropy_sample"], h_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.stats["entropy_batch"], h_b, rtol=1e-5, atol=1e-5)
    sign = torch.where(u > 0, 1.0, -1.0) / math.sqrt(d)
    weight = 0.1 * (0.25 + 3 * 0.75)  # r = 500 / 2000
    torch.testing.assert_close(out.loss, 0.5 * (sign - u).pow(2).sum(1).mean() + weight * (h_s - h_b), rtol=1e-5, atol=1e-5)


def test_bsq_entropy_weight_warms_down_from_three_times():
    assert [entropy_weight(s) for s in (0, 1000, 2000, 10 ** 6)] == pytest.approx([0.3, 0.2, 0.1, 0.1])


def test_trainer_schedule_tells_bsq_the_step():
    from types import SimpleNamespace

    from stage1_tokenizer.schedules import apply_schedules
    q = build_quantizer("bsq", 16, 8)
    apply_schedules(q, 1234, 5000, 100, SimpleNamespace(tau_per_step=False, replacement_phases=[], tau0=1.0, gumbel_epochs=None))
    assert q.step == 1234


# --- IBQ ---------------------------------------------------------------------------------------------
def test_ibq_value_loss_and_gradient_to_every_code():
    k, d = 32, 6
    q = build_quantizer("ibq", k, d)
    z = torch.randn(40, d, requires_grad=True)
    out = q(as_image(z))
    c = q.codebook.detach()
    idx = (z.detach() @ c.T).argmax(1)
    assert torch.equal(out.indices.flatten(), idx)
    torch.testing.assert_close(flat(out.quantized), c[idx])
    logits = z.detach() @ c.T
    p = torch.softmax(logits / 0.01, 1)
    h_s = -(p * torch.log_softmax(logits / 0.01, 1)).sum(1).mean()
    h_b = plain_entropy(p.mean(0), 1e-5)
    mse = (c[idx] - z.detach()).pow(2).mean()
    torch.testing.assert_close(out.loss, 2 * mse + 0.25 * mse + 0.05 * (h_s - h_b), rtol=1e-5, atol=1e-5)
    flat(out.quantized).pow(2).sum().backward()
    assert (q.codebook.grad.abs().sum(1) > 0).all(), "a code got no gradient"
    assert z.grad.abs().sum() > 0


def test_ibq_gradients_equal_the_released_dense_one_hot_product():
    """``z_q = (onehot - sg(s) + s) C`` written out densely gives the same gradients to z and to every code."""
    q = build_quantizer("ibq", 16, 4, entropy_weight=0.0)
    z = torch.randn(30, 4, requires_grad=True)
    g = torch.randn(30, 4)
    out = q(as_image(z))
    torch.autograd.backward([flat(out.quantized), out.loss], [g, torch.ones(())])
    C = q.codebook.detach().clone().requires_grad_()
    zr = z.detach().clone().requires_grad_()
    s = torch.softmax(zr @ C.T, 1)
    hard = F.one_hot(s.argmax(1), 16).float()
    zq = (hard - s.detach() + s) @ C
    c = C[s.argmax(1)]
    loss = F.mse_loss(zq, zr) + F.mse_loss(zr, c.detach()) + 0.25 * F.mse_loss(c, zr.detach())
    torch.autograd.backward([zq, loss], [g, torch.ones(())])
    torch.testing.assert_close(z.grad, zr.grad)
    torch.testing.assert_close(q.codebook.grad, C.grad)


def test_ibq_augmented_table_makes_argmax_a_nearest_code_lookup():
    q = build_quantizer("ibq", 64, 5).eval()
    with torch.no_grad():
        q.codebook.mul_(torch.rand(64, 1) * 3)  # codes of different norms: argmax z.c is not the nearest code
    z = torch.randn(500, 5)
    rng = torch.random.get_rng_state()
    table, in_map, out_map = q.lookup_space()
    assert torch.equal(torch.random.get_rng_state(), rng)  # building the maps draws nothing: sampling stays seeded
    tokens = q(as_image(z)).indices.flatten()
    assert torch.equal(nearest_code(in_map(z), table)[0], tokens)
    assert not torch.equal(nearest_code(z, q.codebook)[0], tokens)
    torch.testing.assert_close(out_map(table), q.codebook.detach())


@pytest.mark.parametrize("name,k", [("fsq", 1000), ("lfq", 1024), ("bsq", 1024), ("ibq", 1024)])
def test_effective_codebook_is_an_explicit_table_and_usage_counts_it(name, k):
    q = build_quantizer(name, k, 16)
    e = q.effective_codebook()
    assert e.shape == (q.num_codes, 16) and q.num_codes == (1000 if name == "fsq" else 1024)
    q.eval()
    out = q(torch.randn(4, 16, 8, 8))
    used = len(torch.unique(out.indices))
    assert out.stats["usage"].item() == pytest.approx(used / q.num_codes)
    torch.testing.assert_close(flat(out.quantized), e[out.indices.flatten()])


def test_every_bit_pattern_is_reachable():
    """LFQ/BSQ tables hold each sign pattern once: K distinct rows."""
    for name in ("lfq", "bsq"):
        q = build_quantizer(name, 2 ** 4, 4)
        assert len(torch.unique(q.table, dim=0)) == 16
        rows = {tuple(r) for r in torch.sign(q.table).tolist()}
        assert rows == set(itertools.product([-1.0, 1.0], repeat=4))


def test_implicit_codebooks_are_not_trained_or_saved():
    q = build_quantizer("lfq", 2 ** 4, 8)
    assert "table" not in q.state_dict() and not any(p is q.table for p in q.parameters())
    with pytest.raises(ValueError, match="fixed implicit"):
        build_quantizer("bsq", 16, 8, kmeans_init=True)
    assert F.mse_loss(q.effective_codebook(), q.proj_out(q.table)) == 0
