"""``VQGPTPipeline`` and the token-sequence helpers it samples with: a GPT prior over VQ tokens plus the tokenizer
that decodes them, as a diffusers pipeline.

Self-contained on purpose (torch, diffusers and transformers only): export copies this file into every GPT
pipeline folder, so ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` runs exactly this code
in a Python without vqgen. Sequences are raster order over the ``h x w`` grid; rvq grids ``(L, h, w)`` are
position-major, depth-minor.
"""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from transformers import GenerationConfig, PreTrainedModel, StaticCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

DECODERS = ("generate", "static", "compiled")


def codes_to_sequence(indices: torch.Tensor) -> torch.Tensor:
    """(B, h, w) -> (B, h*w) raster order; rvq (B, L, h, w) -> (B, h*w*L) position-major, depth-minor."""
    if indices.dim() == 3:
        return indices.flatten(1)
    if indices.dim() == 4:
        return indices.permute(0, 2, 3, 1).flatten(1)
    raise ValueError(f"expected code grids (B, h, w) or (B, L, h, w), got {tuple(indices.shape)}")


def sequence_to_codes(seq: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`codes_to_sequence`; ``grid`` is (h, w) or (L, h, w)."""
    if len(grid) == 2:
        return seq.reshape(seq.shape[0], *grid)
    depth, h, w = grid
    return seq.reshape(seq.shape[0], h, w, depth).permute(0, 3, 1, 2)


def start_tokens(batch: int, num_codes: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1): the start token ``K``, or the class token ``K + 1 + label``; label -1 (dropped in training) is the
    null class, which is the start token ``K`` (LlamaGen's extra class row)."""
    if labels is None:
        return torch.full((batch, 1), num_codes, dtype=torch.long)
    return (num_codes + 1 + labels.long()).reshape(batch, 1)


def generation_config(num_codes: int, vocab_size: int, top_k: int, temperature: float,
                      top_p: float = 1.0) -> GenerationConfig:
    """Top-k then top-p sampling restricted to code ids: start and class tokens are suppressed first."""
    return GenerationConfig(do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature, use_cache=True,
                            suppress_tokens=list(range(num_codes, vocab_size)), bos_token_id=num_codes,
                            pad_token_id=None, eos_token_id=None)


def warpers(gen_cfg: GenerationConfig) -> list:
    """Temperature (when not 1), top-k, top-p (when below 1): ``generate``'s sampling warpers in its order."""
    procs = [TemperatureLogitsWarper(gen_cfg.temperature)] if gen_cfg.temperature != 1.0 else []
    procs.append(TopKLogitsWarper(gen_cfg.top_k))
    if gen_cfg.top_p < 1.0:
        procs.append(TopPLogitsWarper(gen_cfg.top_p))
    return procs


def generate_processors(gen_cfg: GenerationConfig, device: torch.device) -> LogitsProcessorList:
    """The logits processors ``generate`` builds from ``gen_cfg`` (one of :func:`generation_config`'s), in its
    order: suppressed tokens (start and class ids), then :func:`warpers`."""
    return LogitsProcessorList([SuppressTokensLogitsProcessor(gen_cfg.suppress_tokens, device=device),
                                *warpers(gen_cfg)])


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on raw logits (LlamaGen): ``u + s (c - u)``; ``s = 0`` is ``u``, ``s = 1`` is ``c``."""
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def decode_guided(model: PreTrainedModel, prompt: torch.Tensor, seq_len: int, num_codes: int, scale: float,
                  processors: LogitsProcessorList, cfg_interval: int = -1, compiled: bool = False) -> torch.Tensor:
    """Guided sampling: the batch ``[cond; null]`` through one preallocated KV cache; each step's code logits are
    guided, then warped and drawn once, and the drawn code feeds both halves. ``cfg_interval`` m >= 0 (LlamaGen):
    the first code is always guided, decode step ``i`` (0-based from the second code) only while ``i <= m``."""
    batch = len(prompt)
    cache = StaticCache(config=model.config, max_cache_len=seq_len + 1)
    step = torch.compile(model, dynamic=False) if compiled else model
    positions = torch.arange(seq_len, device=prompt.device)
    ids, out = torch.cat([prompt, torch.full_like(prompt, num_codes)]), prompt.new_empty(batch, seq_len)
    for i in range(seq_len):
        logits = step(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=positions[i : i + 1]).logits
        codes = logits[:, -1, :num_codes].float()  # non-code ids masked before guidance
        guided = cfg_interval < 0 or i == 0 or i - 1 <= cfg_interval
        scores = guided_logits(codes[:batch], codes[batch:], scale) if guided else codes[:batch]
        nxt = torch.multinomial(torch.softmax(processors(prompt, scores), dim=-1), num_samples=1)
        out[:, i] = nxt[:, 0]
        ids = torch.cat([nxt, nxt])
    return out


@torch.no_grad()
def decode_static(model: PreTrainedModel, prompt: torch.Tensor, seq_len: int, processors: LogitsProcessorList,
                  compiled: bool = False) -> torch.Tensor:
    """``generate``'s sampling loop without its per-step bookkeeping: a preallocated KV cache (``StaticCache``), so
    every step has one shape and, with ``compiled``, runs one ``torch.compile``'d graph. The same logits, processors
    and ``multinomial`` draws in the same order: the same samples as ``generate`` for the same RNG state."""
    cache = StaticCache(config=model.config, max_cache_len=seq_len + 1)
    step = torch.compile(model, dynamic=False) if compiled else model
    positions = torch.arange(seq_len, device=prompt.device)
    ids, out = prompt, prompt.new_empty(len(prompt), seq_len)
    for i in range(seq_len):
        logits = step(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=positions[i : i + 1]).logits
        scores = processors(prompt, logits[:, -1].to(copy=True, dtype=torch.float32))
        ids = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
        out[:, i] = ids[:, 0]
    return out


@torch.no_grad()
def sample_sequences(model: PreTrainedModel, batch: int, num_codes: int, seq_len: int, top_k: int,
                     temperature: float = 1.0, generator: torch.Generator | None = None,
                     class_labels: torch.Tensor | None = None, use_cache: bool = True,
                     decoder: str = "generate", top_p: float = 1.0, guidance_scale: float = 1.0,
                     cfg_interval: int = -1) -> torch.Tensor:
    """(B, seq_len) code ids sampled with ``generate`` (KV cache), or with :func:`decode_static` (``decoder``
    "static" or "compiled": the same samples, faster); seeded by ``generator`` when given. With class labels and
    ``guidance_scale`` other than 1, :func:`decode_guided` (compiled when ``decoder`` is "compiled").

    ``generate`` draws from the global RNG, so a generator is turned into a seed for a forked RNG:
    the same generator state gives the same samples and the caller's global RNG is untouched.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}; got {decoder!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    guided = guidance_scale != 1.0
    if guided and class_labels is None:
        raise ValueError("guidance needs class labels: an unconditional prior has nothing to guide")
    device = model.device
    prompt = start_tokens(batch, num_codes, class_labels).to(device)
    gen_cfg = generation_config(num_codes, model.config.vocab_size, top_k, temperature, top_p)
    gen_cfg.update(use_cache=use_cache, max_new_tokens=seq_len, min_new_tokens=seq_len)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else None
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if guided:
            return decode_guided(model, prompt, seq_len, num_codes, guidance_scale, LogitsProcessorList(warpers(gen_cfg)),
                                 cfg_interval, compiled=decoder == "compiled")
        if decoder != "generate":
            return decode_static(model, prompt, seq_len, generate_processors(gen_cfg, device),
                                 compiled=decoder == "compiled")
        out = model.generate(prompt, generation_config=gen_cfg, attention_mask=torch.ones_like(prompt))
    return out[:, 1:]


class VQGPTPipeline(DiffusionPipeline):
    """Components ``vqvae`` (a stock ``VQModel``, or a ``VQLookupTokenizer`` for variants it cannot express) and
    ``transformer`` (``GPT2LMHeadModel``); the sampling settings are part of the pipeline config."""

    model_cpu_offload_seq = "transformer->vqvae"

    # the settings have defaults because diffusers treats parameters without one as components
    def __init__(self, vqvae, transformer, num_codes: int | None = None, grid: list[int] | None = None,
                 top_k: int | None = None, temperature: float = 1.0, num_classes: int = 0, top_p: float = 1.0,
                 guidance_scale: float = 1.0, cfg_interval: int = -1, label_dropout: float = 0.0,
                 id2label: dict | None = None):
        super().__init__()
        if num_codes is None or not grid or top_k is None:
            raise ValueError("VQGPTPipeline needs num_codes, grid ((h, w) or (L, h, w)) and top_k")
        self.register_modules(vqvae=vqvae, transformer=transformer)
        self.register_to_config(num_codes=int(num_codes), grid=list(grid), top_k=int(top_k),
                                temperature=float(temperature), num_classes=int(num_classes), top_p=float(top_p),
                                guidance_scale=float(guidance_scale), cfg_interval=int(cfg_interval),
                                label_dropout=float(label_dropout),
                                id2label={str(k): v for k, v in (id2label or {}).items()})
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    @property
    def seq_len(self) -> int:
        n = 1
        for g in self.config.grid:
            n *= g
        return n

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Token grids -> images in [-1, 1]: a stock VQModel looks codes up and decodes without re-quantising."""
        if hasattr(self.vqvae, "decode_indices"):
            return self.vqvae.decode_indices(codes)
        b, h, w = codes.shape
        z = self.vqvae.quantize.get_codebook_entry(codes.reshape(-1), (b, h, w, self.vqvae.config.vq_embed_dim))
        return self.vqvae.decode(z, force_not_quantize=True).sample

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | None = None, top_k: int | None = None,
                 temperature: float | None = None, class_labels: torch.Tensor | list[int] | None = None,
                 output_type: str = "pil", return_dict: bool = True, decoder: str = "generate",
                 guidance_scale: float | None = None, top_p: float | None = None, cfg_interval: int | None = None):
        """Sample ``batch_size`` images; ``class_labels`` (one per image, ``config.id2label`` names them) for
        class-conditional priors, guided by ``guidance_scale`` (1: none) when the prior was trained with label
        dropout; ``decoder`` "compiled" draws the same samples as "generate" (the default) faster for long
        sequences. Unset settings take the pipeline config's."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        cfg = self.config
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if cfg.num_classes == 0:
                raise ValueError("this prior is unconditional; pass class_labels=None")
            if len(class_labels) != batch_size or class_labels.min() < 0 or class_labels.max() >= cfg.num_classes:
                raise ValueError(f"need {batch_size} class labels in [0, {cfg.num_classes})")
        elif cfg.num_classes:
            class_labels = torch.randint(0, cfg.num_classes, (batch_size,), generator=generator)
        top_k = min(top_k or cfg.top_k, cfg.num_codes)
        # settings left unset take the config's (folders exported before guidance lack the keys: the defaults)
        scale = cfg.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
        top_p = cfg.get("top_p", 1.0) if top_p is None else top_p
        cfg_interval = cfg.get("cfg_interval", -1) if cfg_interval is None else cfg_interval
        if scale != 1.0 and not cfg.get("label_dropout", 0.0):
            raise ValueError("this prior was trained without label dropout, so it has no unconditional half to "
                             "guide with; use guidance_scale=1")
        seq = sample_sequences(self.transformer, batch_size, cfg.num_codes, self.seq_len, top_k,
                               cfg.temperature if temperature is None else temperature, generator, class_labels,
                               decoder=decoder, top_p=top_p, guidance_scale=scale, cfg_interval=cfg_interval)
        image = self.decode_codes(sequence_to_codes(seq, tuple(cfg.grid)).to(self.device))
        image = self.image_processor.postprocess(image.float(), output_type=output_type)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
