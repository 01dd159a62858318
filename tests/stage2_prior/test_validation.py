"""Stage 2's held-out split: a seeded, disjoint part of the code cache, scored in bits per token (GPT) and as a
fixed-noise denoising loss (LDM) beside the same protocol on training examples."""
import json
import math

import pytest
import torch

from common.runtime import MetricsLog
from stage2_prior.ldm import diffusion_loss
from stage2_prior.train import GPTTrainer, LDMTrainer, split_validation
from tests.helpers import prior_config, tiny_tokenizer_run


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    return tiny_tokenizer_run(tmp_path_factory.mktemp("tok") / "run")


def test_split_holds_out_a_seeded_disjoint_capped_fraction():
    train, val = split_validation(100, 0.05, 1000, seed=3)
    assert len(val) == 5 and len(train) == 95
    assert set(train.tolist()).isdisjoint(val.tolist()) and set(train.tolist()) | set(val.tolist()) == set(range(100))
    assert torch.equal(split_validation(100, 0.05, 1000, seed=3)[1], val)  # a resumed run holds out the same
    assert not torch.equal(split_validation(100, 0.05, 1000, seed=4)[1], val)
    assert len(split_validation(100_000, 0.05, 1000, 0)[1]) == 1000  # the cap bounds each validation's cost
    assert len(split_validation(8, 0.05, 1000, 0)[1]) == 1  # never rounds a requested split down to nothing
    assert len(split_validation(8, 0.0, 1000, 0)[1]) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_validation(1, 0.5, 10, 0)


def test_bad_validation_settings_fail_clearly(tokenizer_run):
    with pytest.raises(ValueError, match="val_fraction"):
        prior_config("gpt", tokenizer_run, "train.val_fraction=1.5")
    with pytest.raises(ValueError, match="val_every"):
        prior_config("ldm", tokenizer_run, "train.val_every=0")


def test_gpt_validation_is_the_bits_per_token_of_codes_it_never_trains_on(tokenizer_run, tmp_path):
    cfg = prior_config("gpt", tokenizer_run, "train.max_steps=300", "train.lr=3e-3", "gpt.p_keep_start=1.0",
                       "gpt.p_keep_end=1.0", "train.val_fraction=0.25", "train.val_every=100")
    trainer = GPTTrainer(cfg, tmp_path / "gpt")
    val_seqs = trainer.val[0]
    trained = trainer.loader.dataset.tensors[0]
    assert len(val_seqs) == 8 and len(trained) == 24
    assert not (trained[:, None] == val_seqs[None]).all(-1).any(), "a held-out sequence is in the training data"
    trainer.train()
    rows = [r for r in MetricsLog(tmp_path / "gpt" / "metrics.jsonl").read() if "val_bits_per_token" in r]
    assert [r["step"] for r in rows] == [100, 200, 300]
    model = trainer.unwrapped.eval()  # independent: log-softmax and gather in float64, teacher forcing
    K = trainer.codes.num_codes
    inputs = torch.cat([torch.full((len(val_seqs), 1), K), val_seqs[:, :-1]], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=inputs).logits.double(), -1)
    bits = -logp.gather(-1, val_seqs[..., None]).mean().item() / math.log(2)
    assert rows[-1]["val_bits_per_token"] == pytest.approx(bits, rel=1e-4)
    # 24 sequences memorised: the training subset costs almost nothing, the unseen ones far more
    assert rows[-1]["train_bits_per_token"] < 0.25 * rows[-1]["val_bits_per_token"], rows[-1]
    run = json.loads((tmp_path / "gpt" / "run.json").read_text())
    assert run["val_bits_per_token"] == rows[-1]["val_bits_per_token"]
    assert run["num_val_examples"] == 8 and run["num_training_codes"] == 24 and run["mixed_precision"] == "no"
    assert run["best_val_bits_per_token"] == min(r["val_bits_per_token"] for r in rows)
    assert (tmp_path / "gpt" / "validation.png").exists()


def test_ldm_validation_uses_fixed_noise_and_matches_the_v_loss(tokenizer_run, tmp_path):
    cfg = prior_config("ldm", tokenizer_run, "train.max_steps=20", "train.val_every=10", "train.val_fraction=0.25",
                       "ldm.prediction_type=v_prediction")
    trainer = LDMTrainer(cfg, tmp_path / "ldm")
    trainer.train()
    rows = [r for r in MetricsLog(tmp_path / "ldm" / "metrics.jsonl").read() if "val_denoising_loss" in r]
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[0]["val_denoising_loss"] != rows[1]["val_denoising_loss"]
    unet = trainer.unwrapped.eval()
    with torch.no_grad():
        again = trainer._heldout(trainer.val, "val")
        assert again == pytest.approx(rows[-1]["val_denoising_loss"], rel=1e-6)  # only the weights change it
        # independently: v = sqrt(a) eps - sqrt(1 - a) x0 at the noise and timesteps validation fixes
        x0 = trainer.val[0]
        g = torch.Generator().manual_seed(cfg.train.seed)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        a = trainer.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy, v = a.sqrt() * x0 + (1 - a).sqrt() * eps, a.sqrt() * eps - (1 - a).sqrt() * x0
        expected = (unet(noisy, t).sample - v).pow(2).mean().item()
        assert again == pytest.approx(expected, rel=1e-4)
        assert diffusion_loss(unet, trainer.noise_scheduler, x0, eps, t).item() == pytest.approx(expected, rel=1e-5)
    assert (tmp_path / "ldm" / "validation.png").exists()
