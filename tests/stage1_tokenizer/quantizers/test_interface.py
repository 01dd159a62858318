"""Registry, one interface for every variant, eval-mode lookup round trip, bad input."""
import pytest
import torch

from stage1_tokenizer.quantizers import QUANTIZERS, ResidualVQ, build_quantizer

NAMES = ["vq", "ema", "fc", "simvq", "transvq", "ns-vq", "nsvq-noise", "diveq", "diveq-detach", "sf-diveq",
         "sf-diveq-detach", "rotation", "gumbel", "rvq", "fsq", "lfq", "bsq", "ibq"]


def make(name, k=16, d=8, **opts):
    if name.startswith("sf-"):
        opts.setdefault("warmup", 1)
        opts.setdefault("inference", "hard")
    if name == "fsq" and k == 16:
        opts.setdefault("levels", [4, 4])
    return build_quantizer(name, k, d, **opts)


def test_registry_has_exactly_the_named_variants():
    assert list(QUANTIZERS) == NAMES


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        build_quantizer("vqq", 8, 4)
    assert "vqq" in str(e.value) and all(n in str(e.value) for n in NAMES)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError) as e:
        build_quantizer("diveq", 8, 4, sigma=0.1)
    msg = str(e.value)
    assert "sigma" in msg and "noise_std" in msg and "replacement" in msg and "kmeans_init" in msg


@pytest.mark.parametrize("name,old,new", [("diveq", "sigma2", "noise_std"), ("sf-diveq", "sigma2", "noise_std"),
                                          ("sf-diveq", "hard_inference", "inference='hard'")])
def test_renamed_options_say_what_replaced_them(name, old, new):
    """Two options were renamed when the defaults moved to the released code (docs/fidelity.md); an old config fails with the new name, not a silent default."""
    with pytest.raises(ValueError, match=f"option '{old}' was replaced by {new}"):
        build_quantizer(name, 8, 4, **{old: 1e-3 if old == "sigma2" else True})


@pytest.mark.parametrize("bad", [dict(replacement="sometimes"), dict(decay=1.5), dict(replace_every=0)])
def test_bad_option_values(bad):
    name = "ema" if "decay" in bad else "vq"
    with pytest.raises(ValueError):
        build_quantizer(name, 8, 4, **bad)


def test_rvq_bad_base_and_depth():
    with pytest.raises(ValueError, match="base"):
        build_quantizer("rvq", 8, 4, base="rvq")
    with pytest.raises(ValueError, match="num_quantizers"):
        build_quantizer("rvq", 8, 4, num_quantizers=0)


@pytest.mark.parametrize("name", ["transvq", "gumbel"])
def test_unsupported_code_space_maintenance_is_a_clear_error(name):
    with pytest.raises(ValueError, match="reservoir"):
        build_quantizer(name, 8, 4, replacement="reservoir")


@pytest.mark.parametrize("name", NAMES)
def test_every_variant_trains_a_step_with_one_interface(name):
    q = make(name)
    z = torch.randn(2, 8, 3, 5, requires_grad=True)
    for _ in range(3):  # passes SF-DiVeQ's warm-up
        out = q(z)
    assert out.quantized.shape == z.shape
    depth = (2,) if name == "rvq" else ()
    assert out.indices.shape == (2, *depth, 3, 5) and out.indices.dtype == torch.long
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert 0 < out.stats["usage"] <= 1 and 1 <= out.stats["perplexity"] <= 16
    assert "replaced" in out.stats
    (out.quantized.square().mean() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    grads = [p.grad for p in q.parameters() if p.requires_grad]
    if name == "ema":  # learns by moving averages, not gradients
        assert not grads and not torch.equal(q.codebook, q.embed_sum)
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in grads), "no trainable parameter received a gradient"


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic_and_equals_lookup(name):
    q = make(name)
    z = torch.randn(2, 8, 4, 4)
    for _ in range(3):
        q(z)
    q.eval()
    a, b = q(z), q(z)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices)
    assert torch.equal(a.quantized, q.lookup(a.indices))
    assert a.loss.item() == 0
    e = q.effective_codebook()
    assert e.shape == ((2, 16, 8) if name == "rvq" else (16, 8))


@pytest.mark.parametrize("base", ["vq", "diveq", "simvq"])
def test_rvq_with_different_bases_quantizes_residuals(base):
    q = build_quantizer("rvq", 32, 4, base=base, num_quantizers=2)
    assert isinstance(q, ResidualVQ) and all(type(s) is type(q.stages[0]) for s in q.stages)
    z = torch.randn(3, 4, 2, 2)
    q(z)
    q.eval()
    out = q(z)
    zf = z.permute(0, 2, 3, 1).reshape(-1, 4)
    e0, e1 = q.stages[0].effective_codebook(), q.stages[1].effective_codebook()
    i0 = ((zf[:, None] - e0[None]) ** 2).sum(-1).argmin(1)
    i1 = ((zf - e0[i0])[:, None] - e1[None]).pow(2).sum(-1).argmin(1)
    assert out.indices[:, 0].reshape(-1).tolist() == i0.tolist()
    assert out.indices[:, 1].reshape(-1).tolist() == i1.tolist()
    torch.testing.assert_close(out.quantized.permute(0, 2, 3, 1).reshape(-1, 4), e0[i0] + e1[i1])
    # the second depth lowers the error of the first
    assert (zf - e0[i0] - e1[i1]).square().sum() < (zf - e0[i0]).square().sum()


@pytest.mark.parametrize("shape", [(2, 7, 3, 3), (2, 8, 9), (8,)])
def test_wrong_input_shape_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        build_quantizer("vq", 16, 8)(torch.randn(*shape))


def test_lookup_rejects_bad_indices():
    q = build_quantizer("vq", 16, 8)
    with pytest.raises(ValueError, match="indices"):
        q.lookup(torch.full((1, 2, 2), 16, dtype=torch.long))
    with pytest.raises(ValueError, match="long"):
        q.lookup(torch.zeros(1, 2, 2))


@pytest.mark.parametrize("name", ["vq", "simvq", "diveq"])
def test_mixed_precision_quantises_in_fp32(name):
    q = make(name, k=256)
    z = torch.randn(2, 8, 4, 4)
    q.eval()
    ref = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
    assert out.quantized.dtype == torch.float32
    # the bf16 input rounds z, so compare against the fp32 search on the rounded latents
    assert torch.equal(out.indices, q(z.bfloat16().float()).indices)
    assert (out.indices == ref.indices).float().mean() > 0.9


@pytest.mark.parametrize("name", ["ema", "vq"])
def test_non_finite_latents_are_refused_and_leave_the_codebook_intact(name):
    q = make(name)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = torch.randn(1, 8, 2, 2)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        q(z)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
