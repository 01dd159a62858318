"""Every variant against an independent plain-tensor computation of its METHODS.md rule.

Each test drives the module in training mode with an upstream gradient ``g`` (loss
``sum(g * z_q) + aux``) and compares values and gradients with formulas written out here.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from stage1_tokenizer.quantizers import build_quantizer
from stage1_tokenizer.quantizers.gumbel import gumbel_temperature
from stage1_tokenizer.quantizers.ns_vq import dense_embedding_loss, ns_vq_tau
from stage1_tokenizer.quantizers.sf_diveq import project_to_polyline

from conftest import brute_nearest, flat, unflat

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
    q = build_quantizer("simvq", K, D, bias=bias)
    assert not q.codebook.requires_grad and abs(q.codebook.std().item() - D ** -0.5) < 0.2
    z, g = inputs()
    out = run(q, z, g)
    # reference: same weights, plain tensors, autograd of the METHODS formula
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
    attn = torch.stack([(qq[i] @ kk.T) @ vv / (qq[i] @ kk.T).sum() for i in range(len(x))])  # non-causal, row by row
    x = x + attn @ t.attn.out.weight.T
    h = ln(x, t.norm2)
    f0, f2 = t.ffn[0], t.ffn[2]
    x = x + F.gelu(h @ f0.weight.T + f0.bias) @ f2.weight.T + f2.bias
    return ln(x, t.norm_out) @ t.out.weight.T


def test_transvq_map_matches_hand_written_forward_and_trains_through_it():
    q = build_quantizer("transvq", K, D, base_dim=5, width=16)
    assert q.codebook.shape == (K, 5) and not q.codebook.requires_grad
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
    min_dist = (z - C[idx]).square().sum(1)
    for block in (4, 1 << 20):  # blocked and unblocked agree
        got = dense_embedding_loss(z, C, idx, min_dist, tau, 0.05, block)
        assert got.item() == pytest.approx(double_loop_ns_loss(z, C, tau, 0.05), rel=1e-5)


def test_ns_vq_modified_ste_gives_selected_code_2_over_d():
    q = build_quantizer("ns-vq", K, D)
    q.codebook.data = torch.randn(K, D)
    z, g = inputs()
    out = q(z)
    (out.quantized * g).sum().backward()  # the straight-through path alone
    i = brute_nearest(flat(z).detach(), q.codebook.detach())
    torch.testing.assert_close(flat(out.quantized), q.codebook.detach()[i])  # forward value is c
    a = 2.0 / N  # d = B*H*W
    torch.testing.assert_close(q.codebook.grad, torch.zeros(K, D).index_add_(0, i, a * flat(g)))
    torch.testing.assert_close(z.grad, g)
    q_code = build_quantizer("ns-vq", K, D, ste_scale="code")
    assert q_code.ste_coefficient(N) == pytest.approx(2.0 / (N * D))


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
    assert ns_vq_tau(0) == 1.0 and ns_vq_tau(3) == pytest.approx(0.9 ** 3)
    assert ns_vq_tau(2, decay=0.5) == pytest.approx(0.25)


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
        v = 1e-3 ** 0.5 * torch.randn(N, D)  # v ~ N(0, sigma^2 I), sigma^2 = 1e-3
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


def sf_reference(C, z, lam, v, detach):
    """Eq. 12 (or its Eq.-16 form) from plain tensors: (z_q, nearest-endpoint index)."""
    dithered = (1 - lam) * C[:-1] + lam * C[1:]
    i = brute_nearest(z.detach(), dithered.detach())
    c1, c2, li = C[i], C[i + 1], lam[i]

    def term(c, wgt):
        direction = (c - z).detach() + (0 if detach else v)
        return (c - z).norm(dim=1, keepdim=True) * (wgt * direction / direction.norm(dim=1, keepdim=True)).detach()

    zq = z + term(c1, 1 - li) + term(c2, li)
    near = torch.where((z - c2).square().sum(1) < (z - c1).square().sum(1), i + 1, i)
    return zq, near.detach()


@pytest.mark.parametrize("name", ["sf-diveq", "sf-diveq-detach"])
def test_sf_diveq_training_rule(name):
    q = build_quantizer(name, K, D, warmup=0)
    q.codebook.data = torch.randn(K, D)
    z, g = inputs()
    torch.manual_seed(11)
    out = run(q, z, g)
    torch.manual_seed(11)
    lam = torch.rand(K - 1, 1)
    v = 1e-3 ** 0.5 * torch.randn(N, D)
    C, zr = leaf(q.codebook), leaf(z)
    zq, near = sf_reference(C, flat(zr), lam, v, name.endswith("detach"))
    (zq * flat(g)).sum().backward()
    torch.testing.assert_close(flat(out.quantized), zq.detach())
    assert out.indices.reshape(-1).tolist() == near.tolist()
    torch.testing.assert_close(z.grad, zr.grad)
    torch.testing.assert_close(q.codebook.grad, C.grad)
    if name.endswith("detach"):  # forward value is exactly the dithered point between c_i and c_i+1
        dithered = (1 - lam) * C.detach()[:-1] + lam * C.detach()[1:]
        seg = brute_nearest(flat(z).detach(), dithered)
        torch.testing.assert_close(flat(out.quantized), dithered[seg])


def test_sf_diveq_warmup_then_init_from_chunk_means():
    q = build_quantizer("sf-diveq", 4, 2, warmup=2, init_batches=2)
    batches = [torch.randn(1, 2, 2, 2) + i for i in range(3)]
    for zb in batches[:2]:
        out = q(zb)
        torch.testing.assert_close(out.quantized, zb)  # no quantisation during warm-up
    q(batches[2])
    latents = torch.cat([flat(b) for b in batches[:2]])  # the last init_batches warm-up batches
    torch.testing.assert_close(q.codebook.detach(), torch.stack([c.mean(0) for c in latents.chunk(4)]))
    assert q.maintenance.policy == "none"  # SF-DiVeQ needs no replacement


def test_sf_diveq_inference_projects_on_nearest_segment():
    C = torch.randn(6, 3)
    z = torch.randn(50, 3)
    ts = torch.linspace(0, 1, 20001)[:, None]
    best = []
    for zi in z:  # dense search along every segment
        pts = torch.cat([C[j] + ts * (C[j + 1] - C[j]) for j in range(5)])
        best.append(pts[(pts - zi).square().sum(1).argmin()])
    torch.testing.assert_close(project_to_polyline(z, C, 7), torch.stack(best), atol=2e-3, rtol=0)
    q = build_quantizer("sf-diveq", 6, 3, warmup=0)
    q.codebook.data = C
    q.eval()
    zz = z.T.reshape(1, 3, 5, 10)
    out = q(zz)
    assert out.indices.reshape(-1).tolist() == brute_nearest(flat(zz), C).tolist()  # token: nearest codeword
    torch.testing.assert_close(flat(out.quantized), project_to_polyline(flat(zz), C, 1 << 20))
    q.hard_inference = True
    assert torch.equal(q(zz).quantized, q.lookup(out.indices))


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
    min_dist = (z - C.detach()[idx]).square().sum(1)
    assert torch.autograd.gradcheck(lambda c: dense_embedding_loss(z, c, idx, min_dist, 1e3, 10.0, 12), (C,))
