"""The priors' attention switch: the same outputs and gradients from either kernel, the CPU's chosen on a CPU."""
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from stage2_prior.attention import fit_attention
from stage2_prior.config import GPTConfig, LDMConfig
from stage2_prior.gpt import build_gpt
from stage2_prior.ldm import build_unet


def _outputs_and_grads(model, inputs):
    model.zero_grad()
    out = model(*inputs)
    out = out.logits if hasattr(out, "logits") else out.sample
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", ["gpt", "ldm"])
def test_both_kernels_compute_the_same_attention(kind):
    torch.manual_seed(0)
    if kind == "gpt":
        model = build_gpt(GPTConfig(n_layer=2, n_head=2, n_embd=32, dropout=0.0), 16, 15)
        inputs = (torch.randint(0, 17, (3, 16)),)
    else:
        model = build_unet(LDMConfig(block_out_channels=[32, 32], norm_num_groups=8, attention_levels=[1]), 4, 8)
        inputs = (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]))
    fit_attention(model, "cuda")  # the fused kernel (the switch itself needs no GPU)
    fused, fused_grads = _outputs_and_grads(model, inputs)
    fit_attention(model, "cpu")
    explicit, explicit_grads = _outputs_and_grads(model, inputs)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    for a, b in zip(explicit_grads, fused_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if kind == "gpt":
        assert model.config._attn_implementation == "eager"
    else:
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        assert layers and all(isinstance(m.processor, AttnProcessor) for m in layers)
        fit_attention(model, "cuda")
        assert all(isinstance(m.processor, AttnProcessor2_0) for m in layers)
    with pytest.raises(TypeError, match="no attention switch"):
        fit_attention(torch.nn.Linear(2, 2), "cpu")
