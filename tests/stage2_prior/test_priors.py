"""Stage 2: the p_keep schedule and corruption, top-k sampling, the code cache, and both priors training."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.runtime import MetricsLog
from stage1_tokenizer.model import VQTokenizer
from stage2_prior.codes import cache_path, load_codes, read_cache, tokenizer_hash
from stage2_prior.config import GPTConfig, default_top_k, load_prior_config
from stage2_prior.gpt import build_gpt, corrupt, p_keep_at, training_pair
from stage2_prior.train import GPTTrainer, LDMTrainer, train_prior
from stage2_prior.vqgpt_pipeline import codes_to_sequence, sample_sequences, sequence_to_codes
from tests.helpers import TINY_GPT, kill_when, prior_config, subprocess_env, tiny_tokenizer_run


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    return tiny_tokenizer_run(tmp_path_factory.mktemp("tok") / "run")


# --- the p_keep schedule and corruption -------------------------------------------------------
def test_p_keep_rises_on_a_cosine_from_start_to_end():
    total = 1000
    values = [p_keep_at(s, total) for s in range(total + 1)]
    assert values[0] == pytest.approx(0.5) and values[-1] == pytest.approx(0.95)
    assert values[total // 2] == pytest.approx(0.725)  # cosine midpoint: halfway between the endpoints
    assert values[250] == pytest.approx(0.95 - 0.45 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert p_keep_at(5000, total) == pytest.approx(0.95)  # past the end: held


@pytest.mark.parametrize("p_keep", [0.5, 0.8])
def test_corruption_rate_matches_p_keep(p_keep):
    """A token changes with probability (1 - p_keep)(1 - 1/K): replaced, by a code other than itself."""
    K, n = 16, 400_000
    tokens = torch.randint(0, K, (n,))
    out = corrupt(tokens, p_keep, K, torch.Generator().manual_seed(0))
    expected = (1 - p_keep) * (1 - 1 / K)
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert abs((out != tokens).float().mean().item() - expected) < 5 * sigma
    assert out.min() >= 0 and out.max() < K
    # replacements are uniform over the codes
    counts = torch.bincount(out[out != tokens], minlength=K).float()
    assert counts.std() / counts.mean() < 0.05


def test_training_pair_never_targets_the_start_token():
    K = 8
    seq = torch.randint(0, K, (64, 20))
    inputs, targets = training_pair(seq, K, 0.5)
    assert torch.equal(targets, seq) and targets.max() < K
    assert (inputs[:, 0] == K).all() and inputs[:, 1:].max() < K
    labels = torch.arange(64) % 3
    inputs, _ = training_pair(seq, K, 1.0, labels)
    assert torch.equal(inputs[:, 0], K + 1 + labels)
    assert torch.equal(inputs[:, 1:], seq[:, :-1])  # p_keep = 1: the inputs are the shifted targets


def test_sequence_order_round_trips_and_is_position_major_for_rvq():
    grid = torch.randint(0, 50, (3, 4, 5))
    assert torch.equal(sequence_to_codes(codes_to_sequence(grid), (4, 5)), grid)
    rvq = torch.randint(0, 50, (3, 2, 4, 5))  # (B, L, h, w)
    seq = codes_to_sequence(rvq)
    assert torch.equal(seq[:, :2], rvq[:, :, 0, 0]) and torch.equal(seq[:, 2:4], rvq[:, :, 0, 1])
    assert torch.equal(sequence_to_codes(seq, (2, 4, 5)), rvq)
    with pytest.raises(ValueError, match="code grids"):
        codes_to_sequence(torch.zeros(3, 4, dtype=torch.long))


def test_top_k_follows_divek_table_5():
    assert [default_top_k(k) for k in (256, 512, 1024, 4096, 16384)] == [75, 150, 300, 300, 300]


# --- sampling ----------------------------------------------------------------------------------
def _tiny_gpt(K=32, seq_len=12, classes=0):
    torch.manual_seed(0)
    return build_gpt(GPTConfig(n_layer=2, n_head=2, n_embd=32, dropout=0.0), K, seq_len, classes).eval()


def test_sampling_never_emits_special_tokens_even_when_they_dominate():
    K, T = 32, 12
    model = _tiny_gpt(K, T, classes=3)
    model.lm_head.register_forward_hook(lambda m, i, out: out.index_add(
        -1, torch.arange(K, out.shape[-1]), torch.full((*out.shape[:-1], out.shape[-1] - K), 50.0)))
    seq = sample_sequences(model, 16, K, T, top_k=5, generator=torch.Generator().manual_seed(0),
                           class_labels=torch.arange(16) % 3)
    assert seq.shape == (16, T) and seq.max() < K and seq.min() >= 0


def test_top_k_sampling_stays_inside_the_top_k_code_logits():
    K, T, k = 32, 12, 3
    model = _tiny_gpt(K, T)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out[:, -1].detach().clone()))
    seq = sample_sequences(model, 8, K, T, top_k=k, temperature=1.5, generator=torch.Generator().manual_seed(1))
    assert len(seen) >= T
    for step in range(T):
        allowed = seen[step][:, :K].topk(k, dim=-1).indices
        assert (allowed == seq[:, step:step + 1]).any(dim=1).all(), f"step {step} sampled outside the top {k}"


def test_sampling_is_seeded_by_the_generator_and_leaves_the_global_rng_alone():
    model = _tiny_gpt()
    state = torch.get_rng_state()
    a = sample_sequences(model, 4, 32, 12, top_k=10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    b = sample_sequences(model, 4, 32, 12, top_k=10, generator=torch.Generator().manual_seed(7))
    c = sample_sequences(model, 4, 32, 12, top_k=10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    no_cache = sample_sequences(model, 4, 32, 12, top_k=10, generator=torch.Generator().manual_seed(7),
                                use_cache=False)
    assert torch.equal(a, no_cache)  # the KV cache changes the speed, not the samples


# --- the code cache -------------------------------------------------------------------------------
def test_code_cache_matches_the_tokenizer_and_stores_the_scaling_factor(tokenizer_run):
    cache = load_codes(tokenizer_run)
    model = VQTokenizer.from_pretrained(tokenizer_run / "tokenizer").eval()
    assert cache.indices.shape == (32, 8, 8) and cache.latents.shape == (32, 8, 8, 8)
    torch.testing.assert_close(cache.latents, model.quantize.lookup(cache.indices))  # vq: lookup space = codebook
    assert torch.equal(model.requantize(cache.latents), cache.indices)
    assert model.config.scaling_factor == pytest.approx(1 / cache.latents.std().item(), rel=1e-5)
    assert torch.equal(cache.labels, torch.arange(32) % 4)
    from stage1_tokenizer.data import build_dataset
    x = torch.stack([build_dataset("shapes", 16, 3, "train", 32)[i][0] for i in range(4)])
    with torch.no_grad():
        assert torch.equal(model.tokenize(x), cache.indices[:4])


def test_changed_tokenizer_invalidates_the_cache(tokenizer_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tokenizer_run, run)
    first = load_codes(run)
    assert first.tokenizer_hash == tokenizer_hash(run / "tokenizer")
    stamp = cache_path(run).stat().st_mtime_ns
    assert load_codes(run).tokenizer_hash == first.tokenizer_hash and cache_path(run).stat().st_mtime_ns == stamp
    config_path = run / "tokenizer" / "config.json"  # decode settings (a tokenizer saved before latents_mean
    config = json.loads(config_path.read_text())      # existed, one saved after) do not invalidate the codes
    for latents_mean in (None, [0.5] * 4):
        config_path.write_text(json.dumps({**config, "latents_mean": latents_mean}))
        assert tokenizer_hash(run / "tokenizer") == first.tokenizer_hash
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "latents_mean"}))
    assert tokenizer_hash(run / "tokenizer") == first.tokenizer_hash
    weights = run / "tokenizer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["quant_conv.weight"] = state["quant_conv.weight"] * -1.0
    save_file(state, weights)
    second = load_codes(run)
    assert second.tokenizer_hash != first.tokenizer_hash
    assert read_cache(cache_path(run)).tokenizer_hash == tokenizer_hash(run / "tokenizer")
    cache_path(run).write_bytes(b"truncated")  # a corrupt cache is rebuilt, not trusted
    assert load_codes(run).tokenizer_hash == second.tokenizer_hash


def test_prior_can_encode_more_images_than_the_tokenizer_trained_on(tokenizer_run, tmp_path):
    """num_images: the priors' code cache covers more of the source than the tokenizer saw (tau's epochs stay short
    for NS-VQ while the priors get enough data); changing it re-encodes, the default is the tokenizer's set."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tokenizer_run, run)
    cache_path(run).unlink(missing_ok=True)
    more = load_codes(run, num_images=48)
    assert more.indices.shape[0] == 48 and read_cache(cache_path(run)).num_images == 48
    assert torch.equal(more.indices[:32], load_codes(tokenizer_run).indices)  # the same first 32, then 16 unseen
    assert load_codes(run).indices.shape[0] == 32 and read_cache(cache_path(run)).num_images is None
    trainer = GPTTrainer(prior_config("gpt", run, "num_images=40", "train.max_steps=1", "train.val_fraction=0.25"),
                         tmp_path / "gpt")
    assert len(trainer.codes.indices) == 40 and len(trainer.val[0]) == 10


# --- training ----------------------------------------------------------------------------------
def test_gpt_overfits_a_tiny_code_set_and_samples_reproduce_it(tokenizer_run, tmp_path):
    cfg = prior_config("gpt", tokenizer_run, "train.max_steps=600", "train.lr=3e-3", "gpt.p_keep_start=1.0",
                       "gpt.p_keep_end=1.0", "sample.top_k=4", "train.val_fraction=0")  # memorise all 32
    trainer = GPTTrainer(cfg, tmp_path / "gpt")
    trainer.train()
    losses = [r["loss"] for r in MetricsLog(tmp_path / "gpt" / "metrics.jsonl").read()]
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    train_seqs = {tuple(s) for s in codes_to_sequence(trainer.codes.indices).tolist()}
    model = trainer.unwrapped.eval()
    samples = sample_sequences(model, 16, trainer.codes.num_codes, trainer.seq_len, 4, 1.0,
                               torch.Generator().manual_seed(0))
    reproduced = sum(tuple(s) in train_seqs for s in samples.tolist())
    # an unmemorised 64-token sample equals a training sequence with probability ~32 / 32**64
    assert reproduced >= 8, f"only {reproduced}/16 samples are training sequences"
    for name in ("transformer/model.safetensors", "transformer/generation_config.json", "samples.png", "run.json"):
        assert (tmp_path / "gpt" / name).exists(), name


def test_class_conditional_gpt_needs_labels_and_uses_class_tokens(tokenizer_run, tmp_path):
    cfg = prior_config("gpt", tokenizer_run, "train.max_steps=3", "gpt.class_conditional=true")
    trainer = GPTTrainer(cfg, tmp_path / "cond")
    assert trainer.num_classes == 4 and trainer.unwrapped.config.vocab_size == 32 + 1 + 4
    trainer.train()
    assert trainer.sample_images(4, 0).shape == (4, 3, 16, 16)


@pytest.mark.parametrize("prediction,ratio", [("epsilon", 0.6), ("v_prediction", 0.8)])
def test_ldm_loss_falls_and_samples_decode(tokenizer_run, tmp_path, prediction, ratio):
    """v targets start nearer the untrained output, so their loss falls by a smaller factor in 120 steps."""
    cfg = prior_config("ldm", tokenizer_run, "train.max_steps=120", "train.lr=2e-3", "ldm.ema_decay=0.9",
                       f"ldm.prediction_type={prediction}")
    final = train_prior(cfg, tmp_path / "ldm")
    losses = [r["loss"] for r in MetricsLog(tmp_path / "ldm" / "metrics.jsonl").read()]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < ratio * first, (first, last)
    assert json.loads((tmp_path / "ldm" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == prediction
    assert (final / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "ldm" / "scheduler" / "scheduler_config.json").exists()
    assert (tmp_path / "ldm" / "samples.png").exists()


def test_bad_prior_inputs_fail_clearly(tokenizer_run, tmp_path):
    with pytest.raises(ValueError, match="not a finished tokenizer run"):
        GPTTrainer(prior_config("gpt", tmp_path / "nowhere"), tmp_path / "x")
    with pytest.raises(ValueError, match="unknown prior kind"):
        load_prior_config("vae", "tiny")
    with pytest.raises(ValueError, match="gpt.n_layers"):
        prior_config("gpt", tokenizer_run, "gpt.n_layers=3")
    with pytest.raises(ValueError, match="tokenizer run directory"):
        GPTTrainer(load_prior_config("gpt", "tiny"), tmp_path / "y")


def _cli(tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "study.cli", "train-prior", "--tokenizer", str(tokenizer), "--kind", "gpt",
            "--output-dir", str(out), "--max-steps", "40", *TINY_GPT, "gpt.dropout=0.1", "train.checkpoint_every=5",
            "train.val_every=5", *extra]


def test_killed_prior_run_resumes_to_the_same_weights(tokenizer_run, tmp_path):
    load_codes(tokenizer_run)  # encode once here, so both runs find the cache
    env = subprocess_env()
    straight = tmp_path / "straight"
    subprocess.run(_cli(tokenizer_run, straight), env=env, check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    marker = killed / "checkpoints" / "step-00000010" / "COMPLETE"
    kill_when(_cli(tokenizer_run, killed), marker, env)
    assert marker.exists() and not (killed / "transformer").exists(), "the run must be killed mid-way"
    resumed = subprocess.run(_cli(tokenizer_run, killed, "--resume"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a = load_file(straight / "transformer" / "model.safetensors")
    b = load_file(killed / "transformer" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{k} differs after resume")
    steps = [r["step"] for r in MetricsLog(killed / "metrics.jsonl").read()]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    held_out = [[(r["step"], r["val_bits_per_token"]) for r in MetricsLog(run / "metrics.jsonl").read()
                 if "val_bits_per_token" in r] for run in (straight, killed)]
    assert len(held_out[0]) == 8
    for (s1, v1), (s2, v2) in zip(*held_out):  # the same held-out set, scored the same after resume
        assert s1 == s2 and v1 == pytest.approx(v2, abs=1e-5)


def test_encode_command_writes_the_cache(tokenizer_run, tmp_path, capsys):
    import shutil

    from study.cli import main
    run = tmp_path / "run"
    shutil.copytree(tokenizer_run, run)
    shutil.rmtree(run / "codes", ignore_errors=True)
    assert main(["encode", str(run), "--batch-size", "8"]) == 0
    assert "32 code grids (8, 8), K=32" in capsys.readouterr().out
    assert read_cache(cache_path(run)).tokenizer_hash == tokenizer_hash(run / "tokenizer")
    assert main(["encode", str(tmp_path / "missing")]) == 2  # not a run: one clear line, exit status 2
    assert "not a finished tokenizer run" in capsys.readouterr().err


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_reaches_only_the_weights_of_linear_layers(tie):
    """As released (docs/fidelity.md): no decay on embeddings, norms or biases (nor on a head tied to the embedding)."""
    from stage2_prior.config import GPTConfig
    from stage2_prior.gpt import build_gpt
    from stage2_prior.train import adamw

    model = build_gpt(GPTConfig(n_layer=2, n_head=2, n_embd=16, tie_head=tie), 32, 16)
    decay, no_decay = adamw(model, 1e-3, (0.9, 0.95), 0.01).param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    linear = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    expected = sorted(n for n in names.values() if n.endswith(linear)) + ([] if tie else ["lm_head.weight"])
    assert decayed == sorted(expected)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie


def test_ldm_memorises_a_tiny_latent_set_and_samples_land_on_it(tmp_path):
    """The LDM analogue of the GPT memorisation test: trained long on a handful (8) of code latents, DDIM samples
    (before re-quantisation, in the lookup space, after the pipeline divides by the scaling factor) lie far closer
    to a training latent than training latents lie to each other, and decode to the images of those latents.
    With epsilon prediction this fails: samples have ~3x the latents' std (see the ldm tiny preset)."""
    tokenizer_run = tiny_tokenizer_run(tmp_path / "tok", "data.num_images=8", "train.batch_size=8")
    cfg = prior_config("ldm", tokenizer_run, "train.max_steps=800", "train.lr=2e-3", "ldm.ema_decay=0.95",
                       "ldm.num_inference_steps=25", "train.warmup_steps=20", "train.batch_size=8",
                       "train.val_fraction=0")  # all 8 latents are the training set
    trainer = LDMTrainer(cfg, tmp_path / "ldm")
    trainer.train()
    captured = []
    decode = trainer.tokenizer.decode
    trainer.tokenizer.decode = lambda latents, **kw: (captured.append(latents.detach().clone()), decode(latents, **kw))[1]
    try:
        images = trainer.sample_images(16, 0)
    finally:
        trainer.tokenizer.decode = decode
    samples = captured[0].flatten(1)  # LDMPipeline divides by scaling_factor before decode: the lookup space
    train = trainer.codes.latents.flatten(1).to(samples)
    nearest = torch.cdist(samples, train).min(1)
    spread = torch.cdist(train, train)[~torch.eye(len(train), dtype=torch.bool)].median()
    assert nearest.values.median() < 0.4 * spread, (nearest.values.median().item(), spread.item())
    with torch.no_grad():
        originals = (trainer.tokenizer.decode_indices(trainer.codes.indices[nearest.indices].to(samples.device))
                     .clamp(-1, 1) + 1) / 2
    close = ((images - originals.cpu()).abs().flatten(1).mean(1) < 0.05).float().mean()
    assert close >= 0.5, f"only {close:.0%} of the samples decode to their nearest training image"


@pytest.mark.parametrize("decoder", ["static", "compiled"])
def test_static_cache_decoders_sample_exactly_what_generate_samples(decoder):
    """The preallocated-cache loop (compiled or not) draws the same tokens as ``generate`` for the same generator,
    with temperature and class tokens too; a bad decoder name is an error."""
    torch.manual_seed(0)
    model = build_gpt(GPTConfig(n_layer=2, n_head=2, n_embd=64, dropout=0.0), 32, 48, num_classes=3).eval()
    for temperature, labels in ((1.0, None), (0.7, torch.tensor([0, 2, 1, 2, 0, 1]))):
        ref, fast = (sample_sequences(model, 6, 32, 48, 8, temperature, torch.Generator().manual_seed(5), labels,
                                      decoder=d) for d in ("generate", decoder))
        assert ref.shape == (6, 48) and torch.equal(ref, fast)
        assert len({tuple(s) for s in ref.tolist()}) == 6  # random draws, not a degenerate constant
    with pytest.raises(ValueError, match="decoder"):
        sample_sequences(model, 2, 32, 48, 8, decoder="fast")
