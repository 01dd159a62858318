"""Every variant against an independent plain-tensor computation of its rule in docs/methods.md.

Each test drives the module in training mode with an upstream gradient ``g`` (loss
``sum(g * z_q) + aux``) and compares values and gradients with formulas written out here.
"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from stage1_tokenizer.quantizers import build_quantizer
from stage1_tokenizer.quantizers.gumbel import gumbel_temperature
from stage1_tokenizer.quantizers.ns_vq import dense_embedding_loss, ns_vq_tau
from stage1_tokenizer.quantizers.sf_diveq import project_local, project_to_polyline
from tests.helpers import brute_nearest, flat, unflat

B, D, H, W, K = 2, 4, 3, 3, 12
N = B * H * W


def run(q, z, g):
    """Training forward + backward of ``sum(g * z_q) + loss``; returns output."""
    out = q(z)
    ((out.quantized * g).sum() + out.loss).backward()
    return out


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def inputs():
    z = torch.randn(B, D, H, W, requires_grad=True)
    g = torch.randn(B, D, H, W)
    return z, g


def test_vq_values_loss_and_gradients():
    q = build_quantizer("vq", K, D)
    q.codebook.data = torch.randn(K, D)
    z, g = inputs()
    out = run(q, z, g)
    zf, gf, C = flat(z).detach(), flat(g), q.codebook.detach()
    i = brute_nearest(zf, C)
    c = C[i]
    assert out.indices.reshape(-1).tolist() == i.tolist()
    torch.testing.assert_close(flat(out.quantized), c)
    mse = (zf - c).square().mean()
    torch.testing.assert_close(out.loss, (1 + 0.25) * mse)
    # d/dz: upstream copied (STE) + commitment 2 beta (z - c)/numel ; d/dC: codebook term 2 (c - z)/numel
    torch.testing.assert_close(flat(z.grad), gf + 2 * 0.25 * (zf - c) / zf.numel())
    ref_c = torch.zeros_like(C).index_add_(0, i, 2 * (c - zf) / zf.numel())
    torch.testing.assert_close(q.codebook.grad, ref_c)


def test_ema_one_step_equals_hand_computation():
    q = build_quantizer("ema", K, D, decay=0.9)
    C0 = q.codebook.clone()
    z, g = inputs()
    out = run(q, z, g)
    zf = flat(z).detach()
    i = brute_nearest(zf, C0)
    n = torch.bincount(i, minlength=K).float()
    m = torch.zeros(K, D).index_add_(0, i, zf)
    N1 = 0.9 * torch.ones(K) + 0.1 * n  # N_k <- g N_k + (1-g) n_k, N_0 = 1
    M1 = 0.9 * C0 + 0.1 * m  # M_0 = C_0
    smoothed = (N1 + 1e-5) / (N1.sum() + K * 1e-5) * N1.sum()
    torch.testing.assert_close(q.codebook, M1 / smoothed[:, None])
    torch.testing.assert_close(q.cluster_size, N1)
    torch.testing.assert_close(flat(out.quantized), C0[i])  # output uses the pre-update codes
    torch.testing.assert_close(out.loss, 0.25 * (zf - C0[i]).square().mean())
    torch.testing.assert_close(flat(z.grad), flat(g) + 2 * 0.25 * (zf - C0[i]) / zf.numel())


def test_fc_normalised_lookup_and_loss():
    q = build_quantizer("fc", K, D, code_dim=3)
    z, g = inputs()
    out = run(q, z, g)
    Wi, bi, Wo, bo = (t.detach() for t in (q.proj_in.weight, q.proj_in.bias, q.proj_out.weight, q.proj_out.bias))
    zf = flat(z).detach()
    zn = F.normalize(zf @ Wi.T + bi, dim=1)
    Cn = F.normalize(q.codebook.detach(), dim=1)
    i = brute_nearest(zn, Cn)
    assert out.indices.reshape(-1).tolist() == i.tolist()
    torch.testing.assert_close(flat(out.quantized), Cn[i] @ Wo.T + bo)
    torch.testing.assert_close(out.loss, 1.25 * (zn - Cn[i]).square().mean())
    torch.testing.assert_close(q.effective_codebook(), Cn @ Wo.T + bo)


@pytest.mark.parametrize("bias", [False, True])
def test_simvq_effective_codebook_values_and_gradients(bias):
    assert build_quantizer("simvq", K, D).proj.bias is not None  # bias on by default, as released
    q = build_quantizer("simvq", K, D, bias=bias)
    assert not q.codebook.requires_grad and abs(q.codebook.std().item() - D ** -0.5) < 0.2
    z, g = inputs()
    out = run(q, z, g)
    # reference: same weights, plain tensors, autograd of the formula in docs/methods.md
    Wr = leaf(q.proj.weight)
    br = leaf(q.proj.bias) if bias else None
    zr = leaf(z)
    E = q.codebook @ Wr.T + (br if bias else 0)
    zf = flat(zr)
    i = brute_nearest(zf.detach(), E.detach())
    e = E[i]
    zq = zf + (e - zf).detach()
    loss = (zf.detach() - e).square().mean() + 0.25 * (zf - e.detach()).square().mean()
    ((zq * flat(g)).sum() + loss).backward()
    assert out.indices.reshape(-1).tolist() == i.tolist()
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(z.grad, zr.grad)
    torch.testing.assert_close(q.proj.weight.grad, Wr.grad)
    if bias:
        torch.testing.assert_close(q.proj.bias.grad, br.grad)
    q.eval()
    torch.testing.assert_close(q.lookup(out.indices), unflat(E.detach()[i], z))  # lookup includes W


def hand_transvq(q):
    """The TransVQ map P(C) written out from the module's weight tensors."""
    t = q.transform
    ln = lambda x, m: (x - x.mean(1, keepdim=True)) / (x.var(1, unbiased=False, keepdim=True) + m.eps).sqrt() * m.weight + m.bias
    phi = lambda x: torch.where(x > 0, x + 1, torch.exp(x))  # elu(x) + 1
    x = q.codebook @ t.inp.weight.T + t.pos
    h = ln(x, t.norm1)
    qq, kk, vv = phi(h @ t.attn.q.weight.T), phi(h @ t.attn.k.weight.T), h @ t.attn.v.weight.T
    attn = torch.stack([(qq[i] @ kk.T) @ vv / ((qq[i] @ kk.T).sum() + 1e-6)  # non-causal, row by row; + 1e-6
                        for i in range(len(x))])
    x = x + attn @ t.attn.out.weight.T
    h = ln(x, t.norm2)
    f0, f2 = t.ffn[0], t.ffn[2]
    x = x + F.gelu(h @ f0.weight.T + f0.bias) @ f2.weight.T + f2.bias
    return ln(x, t.norm_out) @ t.out.weight.T


def test_transvq_map_matches_hand_written_forward_and_trains_through_it():
    q = build_quantizer("transvq", K, D, base_dim=5, width=16)
    assert q.codebook.shape == (K, 5) and not q.codebook.requires_grad
    big = build_quantizer("transvq", 4096, D)  # position embedding N(0, 1), as the released nn.Embedding
    assert big.transform.pos.std().item() == pytest.approx(1.0, abs=0.02) and abs(big.transform.pos.mean()) < 0.01
    with torch.no_grad():
        torch.testing.assert_close(q.effective_codebook(), hand_transvq(q), rtol=1e-5, atol=1e-5)
    z, g = inputs()
    out = run(q, z, g)
    E = hand_transvq(q).detach()
    zf = flat(z).detach()
    i = brute_nearest(zf, E)
    assert out.indices.reshape(-1).tolist() == i.tolist()
    torch.testing.assert_close(out.loss, 1.25 * (zf - E[i]).square().mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat(z.grad), flat(g) + 0.5 * (zf - E[i]) / zf.numel(), rtol=1e-5, atol=1e-6)
    assert q.transform.attn.q.weight.grad.abs().sum() > 0  # the codebook loss reaches P's weights
    q.eval()
    with torch.no_grad():
        cached = q.effective_codebook()
        assert q.effective_codebook() is cached  # cached in eval


@pytest.mark.parametrize("num_codes", [K, 64])  # N = 18 latents: the full map (K = 12), selected rows only (K = 64)
def test_transvq_gradients_reach_every_weight_as_through_the_full_map(num_codes):
    torch.manual_seed(1)
    q = build_quantizer("transvq", num_codes, D, base_dim=5, width=16)
    z, g = inputs()
    out = run(q, z, g)
    got = {name: p.grad.clone() for name, p in q.named_parameters()}
    q.zero_grad()
    E = hand_transvq(q)  # autograd through P over all K codes, then the gather
    zf = leaf(flat(z))
    i = brute_nearest(zf.detach(), E.detach())
    assert out.indices.reshape(-1).tolist() == i.tolist()
    c = E[i]
    loss = F.mse_loss(c, zf.detach()) + 0.25 * F.mse_loss(zf, c.detach())
    ((zf + (c - zf).detach()) * flat(g)).sum().add(loss).backward()
    for name, p in q.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def double_loop_ns_loss(z, C, tau, lam):
    """Eq. 17 (authors' form) by explicit loops over latents i and codes k."""
    n, d = z.shape
    k_codes = C.shape[0]
    total = 0.0
    for i in range(n):
        dist = [float(((z[i] - C[k]) ** 2).sum()) for k in range(k_codes)]
        winner = min(range(k_codes), key=lambda k: dist[k])
        soft = [math.exp(-x / tau) for x in dist]
        norm = sum(soft)
        for k in range(k_codes):
            w = 1.0 if k == winner else min(1.0, lam * k_codes * soft[k] / norm)
            total += w * dist[k]
    return total / (n * d)


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_ns_vq_dense_loss_equals_double_loop(tau):
    z, C = torch.randn(7, 3), torch.randn(5, 3) * 0.5
    idx = brute_nearest(z, C)
    for block in (4, 1 << 20):  # blocked and unblocked agree
        got, _ = dense_embedding_loss(z, C, idx, tau, 0.05, block)
        assert got.item() == pytest.approx(double_loop_ns_loss(z, C, tau, 0.05), rel=1e-5)


def stable_ns_reference(z, C, tau, lam):
    """Eq. 17 in float64 with a max-shifted softmax: (loss, dL/dC, mean non-winner weight sum)."""
    z, C = z.double(), C.double().detach().requires_grad_(True)
    dist = (z[:, None] - C[None]).square().sum(-1)
    w = (lam * C.shape[0] * torch.softmax(-dist.detach() / tau, 1)).clamp(max=1)
    winner = dist.detach().argmin(1)
    w[torch.arange(len(z)), winner] = 1
    loss = (w * dist).sum() / z.numel()
    loss.backward()
    return loss.detach(), C.grad, (w.sum(1) - 1).mean()


@pytest.mark.parametrize("tau", [1.0, 1e-8, 1e-12])
def test_ns_vq_dense_loss_is_finite_and_correct_at_tiny_tau(tau):
    """tau halves per epoch, so it reaches 1e-8 (the floor) in ~27 epochs: the softmax must not overflow there.
    Latents of realistic scale, so the search's rounding of the minimum distance is far above tau."""
    torch.manual_seed(1)
    z, C0 = torch.randn(64, 8) * 3, torch.randn(16, 8) * 3
    C = C0.clone().requires_grad_(True)
    idx = brute_nearest(z, C0)
    loss, mass = dense_embedding_loss(z, C, idx, tau, 0.01, 1 << 20)
    loss.backward()
    ref_loss, ref_grad, ref_mass = stable_ns_reference(z, C0, tau, 0.01)
    assert torch.isfinite(loss) and torch.isfinite(C.grad).all()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4)
    torch.testing.assert_close(C.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert mass.item() == pytest.approx(ref_mass.item(), rel=1e-4, abs=1e-6)
    q = build_quantizer("ns-vq", 16, 8, tau=tau)
    q.codebook.data = C0.clone()
    out = q(z.T.reshape(1, 8, 8, 8))
    assert torch.isfinite(out.loss) and out.stats["nonwinner_weight"] == pytest.approx(ref_mass.item(), rel=1e-4,
                                                                                        abs=1e-6)


def test_ns_vq_logs_its_kernel_regime():
    """Near-uniform kernel at tau = 1 with the U(-1/K, 1/K) init: every non-winner weight is lambda, the codes'
    spread is tiny beside the latents'; a small tau concentrates the kernel on the winner."""
    q = build_quantizer("ns-vq", K, D)
    z, _ = inputs()
    stats = q(z).stats
    zf, C = flat(z).detach(), q.codebook.detach()
    assert stats["nonwinner_weight"] == pytest.approx(stable_ns_reference(zf, C, 1.0, 0.01)[2].item(), rel=1e-5)
    assert stats["nonwinner_weight"] == pytest.approx(0.01 * (K - 1), rel=0.1)  # nearly uniform
    ratio = (C - C.mean(0)).square().sum(1).mean().sqrt() / (zf - zf.mean(0)).square().sum(1).mean().sqrt()
    assert stats["spread_ratio"] == pytest.approx(ratio.item(), rel=1e-5) and stats["spread_ratio"] < 0.05
    q.tau = 1e-6
    assert q(z).stats["nonwinner_weight"] < 1e-3
    q.eval()
    assert "nonwinner_weight" not in q(z).stats  # a training diagnostic


@pytest.mark.parametrize("ste_scale", ["code", "paper"])
def test_ns_vq_modified_ste_gives_selected_code_a(ste_scale):
    """Default a = 2/(d D) as the authors' code computes it (docs/fidelity.md); the paper's a = 2/d as an option."""
    q = build_quantizer("ns-vq", K, D, **({} if ste_scale == "code" else {"ste_scale": "paper"}))
    q.codebook.data = torch.randn(K, D)
    z, g = inputs()
    out = q(z)
    (out.quantized * g).sum().backward()  # the straight-through path alone
    i = brute_nearest(flat(z).detach(), q.codebook.detach())
    torch.testing.assert_close(flat(out.quantized), q.codebook.detach()[i])  # forward value is c
    a = 2.0 / (N * D) if ste_scale == "code" else 2.0 / N  # d = B*H*W
    torch.testing.assert_close(q.codebook.grad, torch.zeros(K, D).index_add_(0, i, a * flat(g)))
    torch.testing.assert_close(z.grad, g)


def test_ns_vq_loss_gradient_reaches_non_selected_codes():
    q = build_quantizer("ns-vq", K, D, tau=2.0, lam=0.5)
    q.codebook.data = torch.randn(K, D)
    z, g = inputs()
    out = q(z)
    out.loss.backward()
    C, zf = leaf(q.codebook), flat(z).detach()
    i = brute_nearest(zf, C.detach())
    dist = (zf[:, None] - C[None]).square().sum(-1)
    w = (0.5 * K * torch.softmax(-dist.detach() / 2.0, 1)).clamp(max=1)
    w[torch.arange(N), i] = 1
    ref = (w * dist).sum() / (N * D) + 0.25 * (zf - C.detach()[i]).square().mean()
    ref.backward()
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(q.codebook.grad, C.grad)
    selected = torch.zeros(K, dtype=torch.bool)
    selected[i] = True
    assert (q.codebook.grad[~selected].abs().sum(1) > 0).all()  # drift propagates to unselected codes
    assert ns_vq_tau(0) == 1.0 and ns_vq_tau(3) == pytest.approx(0.5 ** 3)  # halved per epoch, as released
    assert ns_vq_tau(2, decay=0.9) == pytest.approx(0.81)  # the paper's 0.9
    assert ns_vq_tau(27) == 1e-8 and ns_vq_tau(100) == 1e-8  # floored
    assert build_quantizer("ns-vq", K, D).tau_decay == 0.5


def test_nsvq_noise_keeps_error_norm_and_passes_gradients():
    q = build_quantizer("nsvq-noise", K, D)
    z, g = inputs()
    torch.manual_seed(5)
    out = run(q, z, g)
    zf = flat(z).detach()
    i = brute_nearest(zf, q.codebook.detach())
    err = (flat(out.quantized) - zf).norm(dim=1)
    torch.testing.assert_close(err, (zf - q.codebook.detach()[i]).norm(dim=1))
    assert out.loss.item() == 0
    # reference with the same noise draw
    torch.manual_seed(5)
    r = torch.randn(N, D)
    C, zr = leaf(q.codebook), leaf(z)
    zq = flat(zr) + ((flat(zr) - C[i]).norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True)) * r
    (zq * flat(g)).sum().backward()
    torch.testing.assert_close(flat(out.quantized), zq)
    torch.testing.assert_close(z.grad, zr.grad)
    torch.testing.assert_close(q.codebook.grad, C.grad)
    q.eval()
    torch.testing.assert_close(flat(q(z).quantized), q.codebook.detach()[i])  # eval: no noise


def eq10_grads(z, c, u, g):
    """DiVeQ Eq. 10 for z_q = z + ||c - z|| u with u held constant: returns (dL/dz, dL/dc)."""
    n = (c - z) / (c - z).norm(dim=1, keepdim=True)
    ug = (u * g).sum(1, keepdim=True)
    return g - n * ug, n * ug


@pytest.mark.parametrize("name", ["diveq", "diveq-detach"])
def test_diveq_forward_and_eq10_gradients(name):
    q = build_quantizer(name, K, D, replacement="none")
    q.codebook.data = torch.randn(K, D)
    z, g = inputs()
    torch.manual_seed(3)
    out = run(q, z, g)
    zf, gf, C = flat(z).detach(), flat(g), q.codebook.detach()
    i = brute_nearest(zf, C)
    c = C[i]
    if name == "diveq":
        torch.manual_seed(3)
        v = 1e-3 * torch.randn(N, D)  # v ~ N(0, s^2 I), noise_std s = 1e-3 (docs/fidelity.md)
        vd = v + (c - zf)
        u = vd / vd.norm(dim=1, keepdim=True)
    else:
        u = (c - zf) / (c - zf).norm(dim=1, keepdim=True)
    torch.testing.assert_close(flat(out.quantized), zf + (c - zf).norm(dim=1, keepdim=True) * u)
    torch.testing.assert_close((flat(out.quantized) - zf).norm(dim=1), (c - zf).norm(dim=1))
    gz, gc = eq10_grads(zf, c, u, gf)
    torch.testing.assert_close(flat(z.grad), gz)
    torch.testing.assert_close(q.codebook.grad, torch.zeros(K, D).index_add_(0, i, gc))
    if name == "diveq-detach":
        torch.testing.assert_close(flat(out.quantized), c)  # the noiseless direction lands on c
    assert out.loss.item() == 0
    fresh = build_quantizer(name, 64, D)
    assert fresh.codebook.min() >= 0 and fresh.codebook.max() <= 1 / 64  # C ~ U(0, 1/K)


def sf_reference(C, z, lam, v, detach, v2=None):
    """Eq. 12 (or its Eq.-16 form) from plain tensors: (z_q, nearest-endpoint index); ``v2`` the second term's
    own noise draw (as released), ``None`` for the paper's one shared ``v``."""
    dithered = (1 - lam) * C[:-1] + lam * C[1:]
    i = brute_nearest(z.detach(), dithered.detach())
    c1, c2, li = C[i], C[i + 1], lam[i]

    def term(c, wgt, noise):
        direction = (c - z).detach() + (0 if detach else noise)
        return (c - z).norm(dim=1, keepdim=True) * (wgt * direction / direction.norm(dim=1, keepdim=True)).detach()

    zq = z + term(c1, 1 - li, v) + term(c2, li, v if v2 is None else v2)
    near = torch.where((z - c2).square().sum(1) < (z - c1).square().sum(1), i + 1, i)
    return zq, near.detach()


@pytest.mark.parametrize("name,shared", [("sf-diveq", False), ("sf-diveq", True), ("sf-diveq-detach", False)])
def test_sf_diveq_training_rule(name, shared):
    """Default: two independent draws v1, v2 (as released); shared_noise: the paper's one v. A large noise_std
    so the two rules give visibly different outputs."""
    q = build_quantizer(name, K, D, warmup=0, noise_std=0.5, shared_noise=shared)
    q.codebook.data = torch.randn(K, D)
    z, g = inputs()
    torch.manual_seed(11)
    out = run(q, z, g)
    torch.manual_seed(11)
    lam = torch.rand(K - 1, 1)
    v1 = 0.5 * torch.randn(N, D)
    v2 = v1 if shared else 0.5 * torch.randn(N, D)
    C, zr = leaf(q.codebook), leaf(z)
    zq, near = sf_reference(C, flat(zr), lam, v1, name.endswith("detach"), v2)
    (zq * flat(g)).sum().backward()
    torch.testing.assert_close(flat(out.quantized), zq.detach())
    assert out.indices.reshape(-1).tolist() == near.tolist()
    torch.testing.assert_close(z.grad, zr.grad)
    torch.testing.assert_close(q.codebook.grad, C.grad)
    if name == "sf-diveq":  # the other noise rule gives a different output: the test tells them apart
        other, _ = sf_reference(C.detach(), flat(z).detach(), lam, v1, False, None if not shared else 0.5 * v1)
        assert not torch.allclose(other, zq.detach())
    if name.endswith("detach"):  # forward value is exactly the dithered point between c_i and c_i+1
        dithered = (1 - lam) * C.detach()[:-1] + lam * C.detach()[1:]
        seg = brute_nearest(flat(z).detach(), dithered)
        torch.testing.assert_close(flat(out.quantized), dithered[seg])


def test_sf_diveq_warmup_then_init_from_chunk_means():
    """The codebook is initialised at the end of the last warm-up step, from the last init_batches batches."""
    q = build_quantizer("sf-diveq", 4, 2, warmup=3, init_batches=2)
    batches = [torch.randn(1, 2, 2, 2) + i for i in range(4)]
    before = q.codebook.detach().clone()
    for step, zb in enumerate(batches[:3]):
        with pytest.warns(UserWarning, match="fewer than 20") if step == 2 else contextlib.nullcontext():
            out = q(zb)
        torch.testing.assert_close(out.quantized, zb)  # no quantisation during warm-up
        assert bool(q.data_initialized) == (step == 2)
        if step < 2:
            assert torch.equal(q.codebook.detach(), before) and len(q.extra_state()["recent"]) == step + 1
    assert q.extra_state()["recent"] == []  # nothing left to checkpoint once initialised
    latents = torch.cat([flat(b) for b in batches[1:3]])  # the last init_batches warm-up batches
    torch.testing.assert_close(q.codebook.detach(), torch.stack([c.mean(0) for c in latents.chunk(4)]))
    q(batches[3])
    assert q.maintenance.policy == "none"  # SF-DiVeQ needs no replacement
    assert build_quantizer("sf-diveq", 4, 2)._recent.maxlen == 50  # as released


def test_sf_diveq_inference_projects_on_nearest_segment():
    C = torch.randn(6, 3)
    z = torch.randn(50, 3)
    ts = torch.linspace(0, 1, 20001)[:, None]
    best, local = [], []
    nearest = brute_nearest(z, C)
    for zi, i in zip(z, nearest.tolist()):  # dense search along every segment, and along the two at c_i
        pts = torch.cat([C[j] + ts * (C[j + 1] - C[j]) for j in range(5)])
        best.append(pts[(pts - zi).square().sum(1).argmin()])
        near = torch.cat([C[j] + ts * (C[j + 1] - C[j]) for j in (i - 1, i) if 0 <= j < 5])
        local.append(near[(near - zi).square().sum(1).argmin()])
    torch.testing.assert_close(project_to_polyline(z, C, 7), torch.stack(best), atol=2e-3, rtol=0)
    torch.testing.assert_close(project_local(z, C, nearest), torch.stack(local), atol=2e-3, rtol=0)
    zz = z.T.reshape(1, 3, 5, 10)
    outputs = {}
    for mode in ("local", "global", "hard"):
        q = build_quantizer("sf-diveq", 6, 3, warmup=0, inference=mode)
        q.codebook.data = C
        q.eval()
        out = q(zz)
        assert out.indices.reshape(-1).tolist() == nearest.tolist()  # token: nearest codeword, in every mode
        outputs[mode] = flat(out.quantized)
    torch.testing.assert_close(outputs["local"], project_local(z, C, nearest))
    torch.testing.assert_close(outputs["global"], project_to_polyline(z, C, 1 << 20))
    torch.testing.assert_close(outputs["hard"], C[nearest])
    assert not torch.allclose(outputs["local"], outputs["global"])  # the data has points where they differ
    q = build_quantizer("sf-diveq", 6, 3, warmup=0)
    q.codebook.data = C
    q.eval().hard_inference = True  # the tokenizer's override for the priors
    assert torch.equal(flat(q(zz).quantized), C[nearest])
    with pytest.raises(ValueError, match="inference must be one of"):
        build_quantizer("sf-diveq", 6, 3, inference="soft")


def rotation_jacobian(z, c):
    u, qh = z / z.norm(), c / c.norm()
    w = (u + qh) / (u + qh).norm()
    R = torch.eye(len(z)) - 2 * torch.outer(w, w) + 2 * torch.outer(qh, u)
    return (c.norm() / z.norm()) * R, R, u, qh


def test_rotation_trick_output_is_c_and_jacobian_is_scaled_rotation():
    q = build_quantizer("rotation", K, D)
    q.codebook.data = torch.randn(K, D)
    z, g = inputs()
    out = run(q, z, g)
    zf, C = flat(z).detach(), q.codebook.detach()
    i = brute_nearest(zf, C)
    torch.testing.assert_close(flat(out.quantized), C[i])
    torch.testing.assert_close(out.loss, 1.25 * (zf - C[i]).square().mean())
    for n in range(4):
        J, R, u, qh = rotation_jacobian(zf[n], C[i[n]])
        torch.testing.assert_close(R.T @ R, torch.eye(D), atol=1e-5, rtol=0)  # orthogonal
        assert torch.linalg.det(R).item() == pytest.approx(1.0, abs=1e-4)  # a proper rotation
        torch.testing.assert_close(R @ u, qh, atol=1e-5, rtol=0)  # takes z's direction to c's
        expect = J.T @ flat(g)[n] + 2 * 0.25 * (zf[n] - C[i[n]]) / zf.numel()
        torch.testing.assert_close(flat(z.grad)[n], expect, atol=1e-5, rtol=1e-5)


def test_rotation_ema_option_learns_codebook_by_ema():
    q = build_quantizer("rotation", K, D, ema=True, decay=0.5)
    assert not q.codebook.requires_grad
    before = q.codebook.clone()
    z, g = inputs()
    run(q, z, g)
    assert not torch.equal(before, q.codebook) and q.codebook.grad is None


def test_gumbel_hard_forward_soft_backward_and_kl():
    q = build_quantizer("gumbel", K, D, temperature=0.7)
    z, g = inputs()
    torch.manual_seed(2)
    out = run(q, z, g)
    torch.manual_seed(2)
    Wl, bl, C, zr = leaf(q.to_logits.weight), leaf(q.to_logits.bias), leaf(q.codebook), leaf(z)
    logits = flat(zr) @ Wl.T + bl
    gumbel = -torch.log(torch.empty(N, K).exponential_())
    y = torch.softmax((logits + gumbel) / 0.7, dim=1)
    i = y.argmax(1)
    y_st = F.one_hot(i, K).float() - y.detach() + y
    p = torch.softmax(logits, 1)
    kl = 5e-4 * (p * torch.log(p * K)).sum(1).mean()
    ((y_st @ C * flat(g)).sum() + kl).backward()
    assert out.indices.reshape(-1).tolist() == i.tolist()
    torch.testing.assert_close(flat(out.quantized), C.detach()[i])
    torch.testing.assert_close(out.loss, kl)
    torch.testing.assert_close(z.grad, zr.grad)
    torch.testing.assert_close(q.codebook.grad, C.grad)
    torch.testing.assert_close(q.to_logits.weight.grad, Wl.grad)
    q.eval()
    assert q(z).indices.reshape(-1).tolist() == (flat(z).detach() @ Wl.detach().T + bl.detach()).argmax(1).tolist()
    assert gumbel_temperature(0, 10) == 1.0 and gumbel_temperature(5, 10) == pytest.approx(0.1 ** 0.5)
    assert gumbel_temperature(20, 10) == pytest.approx(0.1)


def test_rvq_stage_losses_sum_and_second_stage_sees_the_residual():
    q = build_quantizer("rvq", K, D, base="vq", num_quantizers=2)
    for s in q.stages:
        s.codebook.data = torch.randn(K, D)
    z, g = inputs()
    out = run(q, z, g)
    zf = flat(z).detach()
    C0, C1 = (s.codebook.detach() for s in q.stages)
    i0 = brute_nearest(zf, C0)
    r = zf - C0[i0]
    i1 = brute_nearest(r, C1)
    assert out.indices[:, 0].reshape(-1).tolist() == i0.tolist()
    assert out.indices[:, 1].reshape(-1).tolist() == i1.tolist()
    torch.testing.assert_close(flat(out.quantized), C0[i0] + C1[i1])
    torch.testing.assert_close(out.loss, 1.25 * ((zf - C0[i0]).square().mean() + (r - C1[i1]).square().mean()))


def test_ns_vq_dense_loss_analytic_backward_passes_gradcheck():
    """With every weight clamped to 1 the weights are locally constant, so finite differences see sg(w)."""
    z, C = torch.randn(9, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    idx = brute_nearest(z, C.detach())
    assert torch.autograd.gradcheck(lambda c: dense_embedding_loss(z, c, idx, 1e3, 10.0, 12)[0], (C,))
