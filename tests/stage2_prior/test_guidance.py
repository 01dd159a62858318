"""Classifier-free guidance and top-p: label dropout, guided logits and DDIM, the conditional priors and exports."""
import json

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from pipelines.export import export_gpt, export_ldm
from pipelines.sample import load_pipeline
from stage1_tokenizer.model import VQTokenizer
from stage2_prior.cond_ldm_pipeline import ClassConditionalLDMPipeline, guided_output
from stage2_prior.config import GPTConfig
from stage2_prior.gpt import build_gpt, training_pair
from stage2_prior.labels import drop_labels, unet_labels
from stage2_prior.train import GPTTrainer, LDMTrainer
from stage2_prior.vqgpt_pipeline import (
    generation_config,
    guided_logits,
    sample_sequences,
    warpers,
)
from tests.helpers import prior_config, tiny_tokenizer_run

K = 32


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    return tiny_tokenizer_run(tmp_path_factory.mktemp("tok") / "run")


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    model = build_gpt(cfg, K, 12, num_classes=4).eval()
    with torch.no_grad():  # weights of unit scale: an untrained model whose codes depend on the class token
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


# --- label dropout and the null class -----------------------------------------------------------
def test_label_dropout_sends_a_fraction_to_the_null_class_and_leaves_the_rest():
    labels = torch.randint(0, 10, (20000,))
    dropped = drop_labels(labels, 0.1, torch.Generator().manual_seed(0))
    null = dropped == -1
    assert abs(null.float().mean().item() - 0.1) < 0.01
    assert torch.equal(dropped[~null], labels[~null])
    assert torch.equal(drop_labels(labels, 0.0), labels)
    assert torch.equal(unet_labels(dropped, 10)[null], torch.full((int(null.sum()),), 10))


def test_a_dropped_label_starts_the_sequence_with_the_null_token():
    seq = torch.randint(0, K, (4000, 6))
    labels = torch.randint(0, 4, (4000,))
    inputs, targets = training_pair(seq, K, 1.0, labels, torch.Generator().manual_seed(1), label_dropout=0.25)
    start = inputs[:, 0]
    assert torch.equal(targets, seq) and torch.equal(inputs[:, 1:], seq[:, :-1])
    null = start == K  # the start token is the null class
    assert abs(null.float().mean().item() - 0.25) < 0.03
    assert torch.equal(start[~null], K + 1 + labels[~null])


# --- guided logits, top-k, top-p ------------------------------------------------------------------
def test_guidance_scale_one_gives_the_conditional_logits_and_zero_the_unconditional():
    c, u = torch.randn(3, 50), torch.randn(3, 50)
    torch.testing.assert_close(guided_logits(c, u, 1.0), c)
    assert torch.equal(guided_logits(c, u, 0.0), u)
    torch.testing.assert_close(guided_logits(c, u, 2.5), u + 2.5 * (c - u))


def test_top_p_one_is_a_no_op_and_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(warp(logits, p)).squeeze(0).tolist()  # noqa: E731

    def warp(x, p):
        out = x.clone()
        for proc in warpers(generation_config(4, 4, top_k=4, temperature=1.0, top_p=p)):
            out = proc(None, out)
        return out
    assert torch.equal(warp(logits, 1.0), logits)
    assert keep(0.8) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.8
    assert keep(0.81) == [False, True, True, True]
    assert keep(0.4) == [False, True, False, False]


def test_top_k_comes_before_top_p():
    """Top-p acts on the softmax of the top-k survivors (LlamaGen's order): with k = 2 the two best codes hold all
    the mass, so p = 0.6 keeps the best alone when it holds at least 0.6 of the pair."""
    logits = torch.tensor([[3.0, 2.0, 1.9, 1.8]])
    out = logits.clone()
    for proc in warpers(generation_config(4, 4, top_k=2, temperature=1.0, top_p=0.6)):
        out = proc(None, out)
    assert torch.isfinite(out).squeeze(0).tolist() == [True, False, False, False]  # softmax(3, 2) = (0.73, 0.27)


def _draw(gpt, labels, **kw):
    return sample_sequences(gpt, len(labels), K, 12, top_k=K, generator=torch.Generator().manual_seed(5),
                            class_labels=labels, decoder="static", **kw)


def test_guided_sampling_at_zero_samples_the_unconditional_model(gpt):
    """s = 0: the labels no longer matter, whatever they are; s = 3 follows them."""
    a, b = torch.tensor([0, 1, 2]), torch.tensor([3, 3, 0])
    assert torch.equal(_draw(gpt, a, guidance_scale=0.0), _draw(gpt, b, guidance_scale=0.0))
    assert not torch.equal(_draw(gpt, a, guidance_scale=3.0), _draw(gpt, b, guidance_scale=3.0))


def test_guidance_scale_one_runs_the_plain_conditional_sampler(gpt):
    labels = torch.tensor([0, 1, 2, 3])
    assert torch.equal(_draw(gpt, labels, guidance_scale=1.0), _draw(gpt, labels))
    assert torch.equal(_draw(gpt, labels, top_p=1.0), _draw(gpt, labels))


def test_cfg_interval_guides_only_the_first_codes(gpt):
    """cfg_interval m: the first code and decode steps 0..m (the next m + 1 codes) are guided, the rest not."""
    labels = torch.tensor([0, 1, 2, 3])
    always = _draw(gpt, labels, guidance_scale=0.0)
    early = _draw(gpt, labels, guidance_scale=0.0, cfg_interval=1)
    assert torch.equal(early[:, :3], always[:, :3]) and not torch.equal(early, always)


def test_guidance_needs_labels(gpt):
    with pytest.raises(ValueError, match="guidance needs class labels"):
        sample_sequences(gpt, 2, K, 12, top_k=K, guidance_scale=2.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_sequences(gpt, 2, K, 12, top_k=K, top_p=0.0)


# --- guided DDIM ------------------------------------------------------------------------------------
def test_guided_ddim_step_is_the_same_for_epsilon_and_v_prediction():
    """Guidance is affine with weights summing to 1, and DDIM's step is affine in eps and in v alike."""
    torch.manual_seed(0)
    eps_s, v_s = (DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=p,
                                clip_sample=False) for p in ("epsilon", "v_prediction"))
    for s in (eps_s, v_s):
        s.set_timesteps(20)
    t = eps_s.timesteps[5]
    a = eps_s.alphas_cumprod[t]
    x = torch.randn(2, 4, 8, 8)
    eps_c, eps_u = torch.randn_like(x), torch.randn_like(x)
    to_v = lambda eps: a.sqrt() * eps - (1 - a).sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt()  # noqa: E731
    for scale in (0.0, 1.0, 3.0):
        by_eps = eps_s.step(guided_output(eps_c, eps_u, scale), t, x).prev_sample
        by_v = v_s.step(guided_output(to_v(eps_c), to_v(eps_u), scale), t, x).prev_sample
        torch.testing.assert_close(by_v, by_eps, rtol=1e-4, atol=1e-5)


def _cond_ldm(num_classes=3):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=8, out_channels=8, block_out_channels=(16, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       num_class_embeds=num_classes + 1).eval()
    vqvae = VQTokenizer(resolution=8, block_out_channels=(16, 16), latent_channels=8, vq_embed_dim=8,
                        norm_num_groups=4, quantizer="vq", num_codes=32).eval()
    return ClassConditionalLDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler(), num_classes=num_classes)


def test_conditional_ldm_pipeline_follows_its_labels_and_ignores_them_at_scale_zero():
    pipe = _cond_ldm()
    pipe.set_progress_bar_config(disable=True)
    run = lambda labels, s: pipe(batch_size=2, class_labels=labels, guidance_scale=s, num_inference_steps=3,  # noqa: E731
                                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert (run([0, 1], 0.0) == run([2, 2], 0.0)).all()
    assert not (run([0, 1], 2.0) == run([2, 2], 2.0)).all()
    with pytest.raises(ValueError, match="class labels in"):
        run([0, 3], 1.0)


def test_conditional_ldm_pipeline_needs_a_null_embedding():
    pipe = _cond_ldm(3)
    with pytest.raises(ValueError, match="needs 3 "):
        ClassConditionalLDMPipeline(vqvae=pipe.vqvae, unet=pipe.unet, scheduler=pipe.scheduler, num_classes=2)


# --- the conditional priors end to end ------------------------------------------------------------
def test_conditional_priors_train_guided_and_export_pipelines_that_follow_their_labels(tokenizer_run, tmp_path):
    gpt = GPTTrainer(prior_config("gpt", tokenizer_run, "train.max_steps=3", "gpt.class_conditional=true",
                                  "sample.guidance_scale=2.0", "sample.top_p=0.9"), tmp_path / "gpt")
    gpt.train()
    ldm = LDMTrainer(prior_config("ldm", tokenizer_run, "train.max_steps=3", "ldm.class_conditional=true",
                                  "sample.guidance_scale=2.0"), tmp_path / "ldm")
    assert ldm.unwrapped.config.num_class_embeds == 4 + 1
    ldm.train()
    run = json.loads((tmp_path / "gpt" / "run.json").read_text())
    assert run["label_dropout"] == 0.1 and run["guidance_scale"] == 2.0 and run["top_p"] == 0.9
    names = {str(i): f"group {i}" for i in range(4)}  # the shapes source's class names, through the code cache
    assert run["id2label"] == names
    for kind, export in (("gpt", export_gpt), ("ldm", export_ldm)):
        pipe, sidecar = load_pipeline(export(tmp_path / kind, tmp_path / f"pipe-{kind}"))
        assert sidecar["sampling"]["guidance_scale"] == 2.0 and sidecar["classes"] == names
        assert dict(pipe.config.id2label) == names
        call = dict(batch_size=2, output_type="np", **({"num_inference_steps": 2} if kind == "ldm" else {}))
        same = [pipe(**call, class_labels=labels, guidance_scale=0.0, generator=torch.Generator().manual_seed(0)).images
                for labels in ([0, 1], [3, 3])]
        assert (same[0] == same[1]).all()  # the null class alone: labels ignored


def test_guidance_on_an_unconditional_prior_is_refused(tokenizer_run, tmp_path):
    with pytest.raises(ValueError, match="guidance_scale needs gpt.class_conditional"):
        GPTTrainer(prior_config("gpt", tokenizer_run, "sample.guidance_scale=2.0"), tmp_path / "g")
    with pytest.raises(ValueError, match="guidance_scale needs ldm.class_conditional"):
        LDMTrainer(prior_config("ldm", tokenizer_run, "sample.guidance_scale=2.0"), tmp_path / "l")
