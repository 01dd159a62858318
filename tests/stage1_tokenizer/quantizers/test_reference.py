"""Against vector-quantize-pytorch where the semantics coincide: same weights and inputs, same numbers.

Settings that make them coincide: ``VectorQuantize(rotation_trick=False, kmeans_init=False,
threshold_ema_dead_code=0, commitment_weight=beta)`` (its defaults use the rotation trick and
decay 0.8) and ``SimVQ(rotation_trick=False, channel_first=True)``; with those, no difference remains.
"""
import torch
import vector_quantize_pytorch as vqp  # the test extra pins it
from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to as ref_rotate_to

from stage1_tokenizer.quantizers import build_quantizer
from stage1_tokenizer.quantizers.rotation import rotate_to
from tests.helpers import flat

D, K = 6, 32


def test_rotation_trick_matches_reference_values_and_gradients():
    z = torch.randn(50, D, requires_grad=True)
    c = torch.randn(50, D, requires_grad=True)
    z2, c2 = z.detach().clone().requires_grad_(True), c.detach().clone().requires_grad_(True)
    g = torch.randn(50, D)
    ours, theirs = rotate_to(z, c), ref_rotate_to(z2, c2)
    torch.testing.assert_close(ours, theirs)
    (ours * g).sum().backward()
    (theirs * g).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)
    assert c.grad is None or c.grad.abs().max() == 0  # neither passes gradient to the code through the rotation
    assert c2.grad is None or c2.grad.abs().max() == 0


def test_ema_matches_reference_over_several_steps():
    ref = vqp.VectorQuantize(dim=D, codebook_size=K, decay=0.9, eps=1e-5, commitment_weight=0.25,
                             rotation_trick=False, kmeans_init=False, threshold_ema_dead_code=0)
    ours = build_quantizer("ema", K, D, decay=0.9, eps=1e-5, beta=0.25)
    ours.codebook.copy_(ref._codebook.embed[0])
    ours.embed_sum.copy_(ref._codebook.embed_avg[0])
    ours.cluster_size.copy_(ref._codebook.cluster_size[0])
    for _ in range(3):
        z = torch.randn(2, D, 4, 4, requires_grad=True)
        z_ref = flat(z).detach().reshape(2, 16, D).clone().requires_grad_(True)
        g = torch.randn(2, D, 4, 4)
        out = ours(z)
        q_ref, idx_ref, loss_ref = ref(z_ref)
        assert out.indices.reshape(-1).tolist() == idx_ref.reshape(-1).tolist()
        torch.testing.assert_close(flat(out.quantized), q_ref.reshape(-1, D))
        torch.testing.assert_close(out.loss, loss_ref)
        ((out.quantized * g).sum() + out.loss).backward()
        ((q_ref * flat(g).reshape(2, 16, D)).sum() + loss_ref).backward()
        torch.testing.assert_close(flat(z.grad), z_ref.grad.reshape(-1, D))
        torch.testing.assert_close(ours.codebook, ref._codebook.embed[0])
        torch.testing.assert_close(ours.cluster_size, ref._codebook.cluster_size[0])


def test_simvq_without_bias_matches_reference():
    ref = vqp.SimVQ(dim=D, codebook_size=K, rotation_trick=False, channel_first=True)
    ours = build_quantizer("simvq", K, D, bias=False)
    ours.codebook.copy_(ref.frozen_codebook)
    ours.proj.weight.data.copy_(ref.code_transform.weight)
    z = torch.randn(2, D, 3, 3, requires_grad=True)
    z_ref = z.detach().clone().requires_grad_(True)
    g = torch.randn(2, D, 3, 3)
    out = ours(z)
    q_ref, idx_ref, loss_ref = ref(z_ref)
    torch.testing.assert_close(out.quantized, q_ref)
    assert out.indices.tolist() == idx_ref.tolist()
    torch.testing.assert_close(out.loss, loss_ref)
    ((out.quantized * g).sum() + out.loss).backward()
    ((q_ref * g).sum() + loss_ref).backward()
    torch.testing.assert_close(z.grad, z_ref.grad)
    torch.testing.assert_close(ours.proj.weight.grad, ref.code_transform.weight.grad)
    ours.eval()
    torch.testing.assert_close(ours.lookup(out.indices), ref.indices_to_codes(out.indices))  # channel-first
