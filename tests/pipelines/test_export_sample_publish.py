"""Export to stock diffusers, the GPT pipeline, sampling, gFID, Hub publishing and the sweep end to end."""
import ast
import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.export import export_gpt, export_ldm, export_tokenizer, stock_incompatibility, to_vqmodel
from pipelines.publish import needs_remote_code, publish, usage_code
from pipelines.sample import gfid, load_pipeline, sample_batches, write_samples
from stage1_tokenizer import lookup_tokenizer
from stage1_tokenizer.lookup_tokenizer import VQLookupTokenizer
from stage1_tokenizer.model import VQTokenizer
from stage1_tokenizer.quantizers import QUANTIZERS
from stage1_tokenizer.train import load_run
from stage2_prior import cond_ldm_pipeline, vqgpt_pipeline
from stage2_prior.cond_ldm_pipeline import ClassConditionalLDMPipeline
from stage2_prior.train import train_prior
from stage2_prior.vqgpt_pipeline import VQGPTPipeline
from tests.helpers import prior_config, project_packages, tiny_tokenizer_run

OURS = project_packages()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny tokenizer, GPT and LDM (a few steps each) exported as pipeline folders."""
    root = tmp_path_factory.mktemp("pipe")
    tok = tiny_tokenizer_run(root / "tok")
    train_prior(prior_config("gpt", tok, "train.max_steps=5"), root / "gpt")
    train_prior(prior_config("ldm", tok, "train.max_steps=5"), root / "ldm")
    return {"tok": tok, "gpt": export_gpt(root / "gpt", root / "pipe-gpt"),
            "ldm": export_ldm(root / "ldm", root / "pipe-ldm")}


@pytest.fixture(scope="module")
def nonstock(tmp_path_factory):
    """rvq, gumbel and fsq tokenizers (a few steps) with a GPT and an LDM each, exported: {(variant, kind): folder}."""
    root = tmp_path_factory.mktemp("nonstock")
    out = {}
    for name, extra in (("rvq", ["quantizer.options={num_quantizers: 2}"]), ("gumbel", []),
                        ("fsq", ["quantizer.options={levels: [4, 8]}"])):
        tok = tiny_tokenizer_run(root / f"tok-{name}", f"quantizer.name={name}", *extra, "train.max_steps=4")
        for kind, exporter in (("gpt", export_gpt), ("ldm", export_ldm)):
            train_prior(prior_config(kind, tok, "train.max_steps=3"), root / f"{kind}-{name}")
            out[name, kind] = exporter(root / f"{kind}-{name}", root / f"pipe-{kind}-{name}")
    return out


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """Class-conditional GPT and LDM (guidance scale 2, top-p 0.9) on a tiny shapes tokenizer, exported."""
    root = tmp_path_factory.mktemp("cond")
    tok = tiny_tokenizer_run(root / "tok")
    out = {}
    for kind, exporter in (("gpt", export_gpt), ("ldm", export_ldm)):
        train_prior(prior_config(kind, tok, "train.max_steps=3", f"{kind}.class_conditional=true",
                                 "sample.guidance_scale=2.0", *(["sample.top_p=0.9"] if kind == "gpt" else [])),
                    root / kind)
        out[kind] = exporter(root / kind, root / f"pipe-{kind}")
    return out


# --- export --------------------------------------------------------------------------------------
def _tokenizer(name: str, **options) -> VQTokenizer:
    torch.manual_seed(0)
    if name == "rvq":
        options = {"base": "vq", "num_quantizers": 2, **options}
    if name == "fsq":
        options = {"levels": [4, 8], **options}
    return VQTokenizer(resolution=16, block_out_channels=(16, 16), latent_channels=8, vq_embed_dim=8,
                       norm_num_groups=4, quantizer=name, num_codes=32, quantizer_options=options,
                       scaling_factor=2.5).eval()


@pytest.mark.parametrize("name", [q for q in QUANTIZERS if q not in ("rvq", "gumbel", "fsq")])
def test_stock_vqmodel_equals_the_tokenizer(name):
    """Same tokens, same decode of given tokens (1e-5), same reconstruction, for every nearest-lookup variant."""
    tok = _tokenizer(name, **({"inference": "hard"} if name.startswith("sf-") else {}))
    vq = to_vqmodel(tok)
    assert vq.config.scaling_factor == 2.5
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        tokens = tok.tokenize(x)
        h = vq.encode(x).latents
        _, _, (_, _, stock_tokens) = vq.quantize(h)
        assert torch.equal(stock_tokens.view(tokens.shape), tokens)
        idx = torch.randint(0, 32, (3, 8, 8))
        z = vq.quantize.get_codebook_entry(idx.reshape(-1), (3, 8, 8, vq.config.vq_embed_dim))
        ours = tok.decode_indices(idx)
        torch.testing.assert_close(vq.decode(z, force_not_quantize=True).sample, ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(vq(x).sample, tok(x)[0], rtol=0, atol=1e-5)
        # the LDM's latents live in the same space in both: re-quantising them decodes identically
        latents = tok.lookup_latents(idx)
        torch.testing.assert_close(vq.decode(latents).sample, tok.decode(latents).sample, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["vq", "simvq", "transvq", "sf-diveq", "rvq", "gumbel", "fsq", "ibq"])
def test_a_centred_tokenizer_exports_a_decode_of_centred_latents_equal_to_the_plain_one(name, tmp_path):
    """With ``latents_mean`` set (a centred LDM), the export (stock: folded into the lookup space; lookup tokenizer:
    its config, round-tripped) decodes ``latents - mean`` as the plain tokenizer decodes ``latents``; the stock
    model's own tokens and reconstructions are unchanged by the translation."""
    tok = _tokenizer(name, **({"inference": "hard"} if name.startswith("sf-") else {}))
    plain = export_tokenizer(tok)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        tokens = tok.tokenize(x)
        latents = tok.lookup_latents(tokens) + 0.01 * torch.randn_like(tok.lookup_latents(tokens))
        mean = latents.mean((0, 2, 3)) + torch.randn(latents.shape[1])  # an offset of the codes' own scale
        tok.register_to_config(latents_mean=mean.tolist())
        export_tokenizer(tok).save_pretrained(tmp_path, safe_serialization=True)
        centred = type(plain).from_pretrained(tmp_path).eval()
        centred_latents = latents - mean.view(1, -1, 1, 1)
        want = plain.decode(latents).sample
        torch.testing.assert_close(centred.decode(centred_latents).sample, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(tok.decode(centred_latents).sample, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(centred(x).sample, plain(x).sample, rtol=0, atol=1e-5)
        if isinstance(centred, VQLookupTokenizer):
            assert centred.config.latents_mean == pytest.approx(mean.tolist())
        else:  # stock: nothing in the config, the translation lives in the weights
            assert "latents_mean" not in centred.config
            _, _, (_, _, stock_tokens) = centred.quantize(centred.encode(x).latents)
            assert torch.equal(stock_tokens.view(tokens.shape), tokens)


def test_a_centred_ldm_trains_on_zero_mean_unit_variance_latents_and_its_export_decodes_the_cache(tmp_path):
    """``ldm.center_latents``: the UNet's examples have per-channel mean 0 and std 1, run.json keeps the mean and
    the centred scale, and the exported stock pipeline decodes centred cache latents to the cached codes' images."""
    from stage2_prior.train import LDMTrainer

    tok = tiny_tokenizer_run(tmp_path / "tok", "train.max_steps=4")
    trainer = LDMTrainer(prior_config("ldm", tok, "train.max_steps=2", "ldm.center_latents=true",
                                      "train.val_fraction=0.5"), tmp_path / "ldm")
    examples = torch.cat([trainer.val[0], trainer.train_probe[0]])  # half held out, half probed: all of them
    assert len(examples) == 32
    torch.testing.assert_close(examples.mean((0, 2, 3)), torch.zeros(examples.shape[1]), rtol=0, atol=1e-5)
    assert examples.std().item() == pytest.approx(1, rel=1e-4)
    trainer.train()
    codes = trainer.codes  # the cache the trainer read, not a second read of it
    mean = codes.latents.mean((0, 2, 3))
    run = json.loads((tmp_path / "ldm" / "run.json").read_text())
    assert run["latents_mean"] == pytest.approx(mean.tolist(), abs=1e-5)
    centred = codes.latents - mean.view(1, -1, 1, 1)
    assert run["scaling_factor"] == pytest.approx(1 / centred.std().item(), rel=1e-4)
    assert run["scaling_factor"] != pytest.approx(codes.scaling_factor, rel=1e-3)  # the uncentred scale differs
    pipe, _ = load_pipeline(export_ldm(tmp_path / "ldm", tmp_path / "pipe"), device="cpu")
    assert pipe.vqvae.config.scaling_factor == pytest.approx(run["scaling_factor"])
    _, plain = load_run(tok)
    plain.set_hard_inference(True)
    with torch.no_grad():
        torch.testing.assert_close(pipe.vqvae.decode(centred[:4]).sample, plain.decode_indices(codes.indices[:4]),
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["rvq", "gumbel", "fsq"])
def test_variants_without_a_stock_form_export_an_equal_lookup_tokenizer(name, tmp_path):
    """Same tokens, reconstruction, decode of tokens and of prior latents as the trained tokenizer; round-trips."""
    tok = _tokenizer(name)
    reason = stock_incompatibility(tok)
    assert reason and {"rvq": "codebooks", "gumbel": "logits", "fsq": "nonlinear"}[name] in reason
    with pytest.raises(ValueError, match="cannot export as a stock VQModel"):
        to_vqmodel(tok)
    model = export_tokenizer(tok)
    assert isinstance(model, VQLookupTokenizer) and model.config.scaling_factor == 2.5
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = VQLookupTokenizer.from_pretrained(tmp_path).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        tokens = tok.tokenize(x)
        assert torch.equal(loaded.tokenize(x), tokens) and tokens.shape == ((3, 2, 8, 8) if name == "rvq" else (3, 8, 8))
        torch.testing.assert_close(loaded(x).sample, tok(x)[0], rtol=0, atol=1e-5)
        random = torch.randint(0, 32, tokens.shape)
        torch.testing.assert_close(loaded.decode_indices(random), tok.decode_indices(random), rtol=0, atol=1e-5)
        latents = tok.lookup_latents(random) + 0.01 * torch.randn_like(tok.lookup_latents(random))
        assert torch.equal(loaded.requantize(latents), tok.requantize(latents))
        torch.testing.assert_close(loaded.decode(latents).sample, tok.decode(latents).sample, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="expected tokens of shape"):
        loaded.decode_indices(torch.zeros(2, 8, dtype=torch.long))


def test_remote_code_modules_import_only_torch_diffusers_and_transformers():
    """The files export copies into pipeline folders must run where vqgen is not installed."""
    allowed = {"__future__", "torch", "diffusers", "transformers"}
    for module in (vqgpt_pipeline, lookup_tokenizer, cond_ldm_pipeline):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.level == 0}
        relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
        assert imported <= allowed and not relative, (module.__name__, imported - allowed)


STOCK_ONLY = textwrap.dedent("""
    import sys, torch
    from diffusers import LDMPipeline, VQModel
    ldm_dir, gpt_dir, idx_path, out_path = sys.argv[1:]
    pipe = LDMPipeline.from_pretrained(ldm_dir)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3), images.shape
    vq = VQModel.from_pretrained(gpt_dir, subfolder="vqvae")
    idx = torch.load(idx_path, weights_only=True)
    z = vq.quantize.get_codebook_entry(idx.reshape(-1), (*idx.shape, vq.config.vq_embed_dim))
    torch.save(vq.decode(z, force_not_quantize=True).sample, out_path)
    ours = [m for m in sys.modules if m.split(".")[0] in {ours!r}]
    assert not ours, ours
    print("stock ok")
""").replace("{ours!r}", repr(set(OURS)))


def test_exports_load_and_sample_with_stock_diffusers_alone(exported, tmp_path):
    idx = torch.randint(0, 32, (2, 8, 8))
    torch.save(idx, tmp_path / "idx.pt")
    script = tmp_path / "stock.py"
    script.write_text(STOCK_ONLY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, str(script), str(exported["ldm"]), str(exported["gpt"]),
                          str(tmp_path / "idx.pt"), str(tmp_path / "out.pt")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "stock ok" in run.stdout, run.stderr[-3000:]
    _, tok = load_run(exported["tok"])
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), tok.decode_indices(idx),
                                   rtol=0, atol=1e-5)


CARD_SNIPPET = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np
    assert not [m for m in {ours!r} if importlib.util.find_spec(m)], "vqgen must not be importable here"
    out = {}
    for folder, snippet in json.loads(open(sys.argv[1]).read()).items():
        scope = {}
        exec(snippet, scope)
        out[folder] = np.stack([np.asarray(image) for image in scope["images"]])
        assert type(scope["pipe"]).__module__.split(".")[0] in ("diffusers", "diffusers_modules"), type(scope["pipe"])
    np.savez(sys.argv[2], **{str(i): out[f] for i, f in enumerate(out)})
    assert not [m for m in sys.modules if m.split(".")[0] in {ours!r}]
    print("remote ok")
""").replace("{ours!r}", repr(set(OURS)))


def _own_pipeline(folder: Path):
    """The folder's pipeline built from vqgen's own classes (not the copies diffusers loads as remote code)."""
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel
    from transformers import GPT2LMHeadModel

    index = json.loads((folder / "model_index.json").read_text())
    vqvae_cls = VQLookupTokenizer if index["vqvae"][1] == "VQLookupTokenizer" else VQModel
    vqvae = vqvae_cls.from_pretrained(folder / "vqvae")
    if "transformer" in index:
        settings = {k: index[k] for k in ("num_codes", "grid", "top_k", "temperature", "num_classes", "top_p",
                                          "guidance_scale", "cfg_interval", "label_dropout", "id2label") if k in index}
        return VQGPTPipeline(vqvae=vqvae, transformer=GPT2LMHeadModel.from_pretrained(folder / "transformer"),
                             **settings)
    parts = dict(vqvae=vqvae, unet=UNet2DModel.from_pretrained(folder / "unet"),
                 scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"))
    if "ClassConditionalLDMPipeline" in index["_class_name"]:  # remote code: [module, class]
        return ClassConditionalLDMPipeline(**parts, **{k: index[k] for k in ("num_classes", "guidance_scale", "id2label")})
    return LDMPipeline(**parts)


def test_card_snippet_loads_every_export_in_stock_diffusers_and_equals_vqgen(exported, nonstock, conditional,
                                                                             tmp_path):
    """GPT (vq, rvq, gumbel, fsq, class-conditional and guided) with trust_remote_code, LDM of a stock VQModel
    without it, the guided class-conditional LDM with it: the card's own "Use" code, run where vqgen cannot be
    imported, gives exactly the images of vqgen's classes for the same seed."""
    folders = [exported["gpt"], exported["ldm"], *nonstock.values(), *conditional.values()]
    assert not needs_remote_code(exported["ldm"]) and all(needs_remote_code(f) for f in folders if f != exported["ldm"])
    snippets = {str(f): usage_code(json.loads((f / "vqgen.json").read_text()), str(f), needs_remote_code(f),
                                   batch_size=2) for f in folders}
    (tmp_path / "snippets.json").write_text(json.dumps(snippets))
    (tmp_path / "run.py").write_text(CARD_SNIPPET)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(site.getsitepackages())  # with -S: the deps, not the editable vqgen
    run = subprocess.run([sys.executable, "-S", str(tmp_path / "run.py"), str(tmp_path / "snippets.json"),
                          str(tmp_path / "images.npz")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "remote ok" in run.stdout, run.stderr[-3000:]
    remote = np.load(tmp_path / "images.npz")
    for i, folder in enumerate(folders):
        scope = {"DiffusionPipeline": None}
        code = snippets[str(folder)].replace("DiffusionPipeline.from_pretrained", "_own")
        exec(code, {**scope, "_own": lambda src, **kw: _own_pipeline(Path(src))}, scope)
        ours = np.stack([np.asarray(image) for image in scope["images"]])
        assert ours.shape == (2, 16, 16, 3) and np.array_equal(remote[str(i)], ours), folder.name


# --- the GPT pipeline ----------------------------------------------------------------------------
def test_gpt_pipeline_round_trip_gives_identical_samples(exported, tmp_path):
    pipe = _own_pipeline(exported["gpt"])
    a = pipe(batch_size=3, generator=torch.Generator().manual_seed(3), output_type="pt").images
    remote, _ = load_pipeline(exported["gpt"])  # the folder's own copy of the class, as diffusers users load it
    assert type(remote) is not VQGPTPipeline and type(remote).__name__ == "VQGPTPipeline"
    assert torch.equal(remote(batch_size=3, generator=torch.Generator().manual_seed(3), output_type="pt").images, a)
    pipe.save_pretrained(tmp_path / "again", safe_serialization=True)
    assert not list((tmp_path / "again").rglob("*.bin"))
    again = VQGPTPipeline.from_pretrained(tmp_path / "again")
    b = again(batch_size=3, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    assert again.config.top_k == pipe.config.top_k and list(again.config.grid) == [8, 8]
    np_images = again(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np_images.shape == (2, 16, 16, 3)
    pil = again(batch_size=1, output_type="pil").images
    assert pil[0].size == (16, 16)
    with pytest.raises(ValueError, match="output_type"):
        again(batch_size=1, output_type="jpeg")
    with pytest.raises(ValueError, match="unconditional"):
        again(batch_size=1, class_labels=[0])


def test_sample_writes_images_and_gfid_scores_a_pipeline(exported, tmp_path):
    pipe, sidecar = load_pipeline(exported["ldm"])
    out = write_samples(pipe, sidecar, 5, tmp_path / "samples", batch_size=2, seed=1)
    assert len(list(out.glob("0*.png"))) == 5 and (out / "grid.png").exists()
    result = gfid(exported["gpt"], "shapes", num_images=6, batch_size=3, cache_dir=tmp_path / "stats")
    assert result["gfid"] > 0 and result["num_images"] == 6
    assert list((tmp_path / "stats").glob("*.npz")), "the reference statistics are cached"
    assert not list(tmp_path.glob("*.png"))  # no images written unless asked


# --- publishing ------------------------------------------------------------------------------------
class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


def test_publish_dry_run_writes_the_card_and_uploads_nothing(exported, tmp_path, monkeypatch, capsys):
    secret = "hf_SECRET_token_never_shown_12345"
    monkeypatch.setenv("HF_TOKEN", secret)
    sidecar = json.loads((exported["gpt"] / "vqgen.json").read_text())
    sidecar["metrics"] = {"gfid": 12.5, "rfid": 3.25, "usage": 0.9, "perplexity": 200.0, "num_images": 1000}
    (exported["gpt"] / "vqgen.json").write_text(json.dumps(sidecar))
    api = FakeApi()
    staged = publish(exported["gpt"], "someone/vqgen-test", dry_run=True, output_dir=tmp_path / "staged", api=api)
    assert api.calls == []
    card = (staged / "README.md").read_text()
    assert "model-index" in card and "12.5" in card and "3.25" in card and "someone/vqgen-test" in card
    assert usage_code(sidecar, "someone/vqgen-test", True) in card and "samples.png" in card
    assert "trust_remote_code=True" in card and (staged / "vqgpt_pipeline.py").exists()
    assert "(16x16 colour images)" in card  # the tiny tokenizer: 3-channel shapes at 16 px
    for name in ("model_index.json", "transformer/model.safetensors", "vqvae/config.json", "samples.png"):
        assert (staged / name).exists(), name
    from huggingface_hub import ModelCard
    meta = ModelCard.load(staged / "README.md").data.to_dict()
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["gfid"] == 12.5
    assert meta["vqgen"]["quantizer"] == "vq" and meta["vqgen"]["config"]["tokenizer"]["quantizer"]["name"] == "vq"
    assert meta["vqgen"]["config"]["prior"]["kind"] == "gpt"
    for path in staged.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in capsys.readouterr().out + capsys.readouterr().err


def test_publish_uploads_through_the_hub_api_without_exposing_the_token(exported, tmp_path, monkeypatch, capsys):
    secret = "hf_SECRET_token_never_shown_67890"
    monkeypatch.setenv("HF_TOKEN", secret)
    api = FakeApi()
    staged = publish(exported["ldm"], "someone/ldm", private=True, output_dir=tmp_path / "up", api=api)
    (name, repo, kwargs), (name2, repo2, kwargs2) = api.calls
    assert (name, repo, kwargs["private"]) == ("create_repo", "someone/ldm", True)
    assert (name2, repo2, kwargs2["folder_path"]) == ("upload_folder", "someone/ldm", str(staged))
    assert 'DiffusionPipeline.from_pretrained("someone/ldm")' in (staged / "README.md").read_text()
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("pipelines.publish.get_token", lambda: None)
    with pytest.raises(ValueError, match="no Hugging Face token"):
        publish(exported["ldm"], "someone/ldm", output_dir=tmp_path / "up2", api=FakeApi())
    with pytest.raises(ValueError, match="OWNER/NAME"):
        publish(exported["ldm"], "no-owner", dry_run=True)


def test_published_folder_names_its_data_and_leaks_no_local_path(tmp_path, monkeypatch):
    """A tokenizer trained on a local folder: no staged file mentions the run's, data's or home's absolute paths;
    ``datasets`` (Hub links) only for a Hub id; the card validates and carries KID and intervals."""
    from huggingface_hub import ModelCard

    from stage1_tokenizer.data import Shapes

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = tmp_path / "home" / "me" / "my-digits"
    data.mkdir(parents=True)
    shapes = Shapes(24, 16, 3)
    for i in range(24):
        shapes.draw(i).save(data / f"{i:03d}.png")
    tok = tiny_tokenizer_run(tmp_path / "home" / "runs" / "tok", f"data.source={data}", "train.max_steps=3")
    train_prior(prior_config("ldm", tok, "train.max_steps=2"), tmp_path / "home" / "runs" / "ldm")
    folder = export_ldm(tmp_path / "home" / "runs" / "ldm", tmp_path / "home" / "runs" / "pipe")
    sidecar = json.loads((folder / "vqgen.json").read_text())
    assert sidecar["dataset"] == "my-digits" and sidecar["data_source"] is None
    assert sidecar["config"]["tokenizer"]["data"]["source"] == "my-digits"
    sidecar["metrics"] = {"gfid": 80.5, "gfid_ci": [75.25, 86.0], "kid": 0.0425, "kid_std": 0.0031,
                          "precision": 0.61, "recall": 0.47, "num_images": 1000}
    (folder / "vqgen.json").write_text(json.dumps(sidecar))
    roots = [str(tmp_path), str(Path.home()), str(data), str(tok.resolve())]

    def staged_text(out: Path) -> dict:
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".safetensors"}

    plain = publish(folder, "me/ldm", dry_run=True, output_dir=tmp_path / "plain")
    hub = publish(folder, "me/ldm", dry_run=True, output_dir=tmp_path / "hub", dataset="ylecun/mnist")
    for out in (plain, hub):
        for path, content in staged_text(out).items():
            for root in roots:
                assert root.encode() not in content, (path, root)
    meta = ModelCard.load(plain / "README.md").data.to_dict()
    assert "datasets" not in meta and meta["model-index"][0]["results"][0]["dataset"]["name"] == "my-digits"
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["kid"] == 0.0425 and metrics["precision"] == 0.61
    card = (plain / "README.md").read_text()
    assert "[75.25, 86]" in card and "± 0.0031" in card
    hub_meta = ModelCard.load(hub / "README.md").data.to_dict()
    assert hub_meta["datasets"] == ["ylecun/mnist"]
    assert json.loads((hub / "vqgen.json").read_text())["dataset"] == "ylecun/mnist"
    with pytest.raises(ValueError, match="pass --data"):
        gfid(folder, num_images=2)
    # an older export with a path in it is redacted on staging; a path anywhere else stops the upload
    sidecar["prior_run"] = str(tmp_path / "home" / "runs" / "ldm")
    (folder / "vqgen.json").write_text(json.dumps(sidecar))
    redacted = publish(folder, "me/ldm", dry_run=True, output_dir=tmp_path / "old")
    assert json.loads((redacted / "vqgen.json").read_text())["prior_run"] == "ldm"
    (folder / "notes.txt").write_text(f"trained from {data}")
    with pytest.raises(ValueError, match="local paths in notes.txt"):
        publish(folder, "me/ldm", dry_run=True, output_dir=tmp_path / "leak")


def test_rvq_gumbel_and_fsq_run_through_both_priors_and_export_lookup_tokenizers(nonstock):
    """rvq: the GPT models all depths (sequence length L*h*w); every non-stock pipeline loads and samples."""
    run = json.loads((nonstock["rvq", "gpt"].parent / "gpt-rvq" / "run.json").read_text())
    assert run["seq_len"] == 2 * 8 * 8
    for folder in nonstock.values():
        assert json.loads((folder / "vqgen.json").read_text())["stock_vqmodel"] is False
        pipe, sidecar = load_pipeline(folder)
        assert type(pipe.vqvae).__name__ == "VQLookupTokenizer"
        images = next(iter(sample_batches(pipe, sidecar, 2, 2)))
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
