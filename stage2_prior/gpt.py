"""The GPT prior over raster-ordered code grids (DiVeQ Sec. A.2; Esser et al. 2021), on ``GPT2LMHeadModel``.

Vocabulary: codes ``0..K-1``, the start token ``K``, then one class token ``K+1+c`` per class when
class-conditional (the class token takes the start token's place). Sequences are raster order over
the ``h x w`` grid; for an rvq tokenizer each position carries its ``L`` depths in turn
(position-major, depth-minor: ``(p0,d0), (p0,d1), ..., (p1,d0), ...``), so a position's residual
codes are predicted coarse to fine before the next position starts.
"""
from __future__ import annotations

import math

import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from .config import GPTConfig


def build_gpt(cfg: GPTConfig, num_codes: int, seq_len: int, num_classes: int = 0) -> GPT2LMHeadModel:
    """A GPT-2 with vocabulary K + 1 (+ classes) and room for the start token plus ``seq_len`` codes."""
    config = GPT2Config(vocab_size=num_codes + 1 + num_classes, n_positions=seq_len + 1, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                        attn_pdrop=cfg.dropout, bos_token_id=num_codes, eos_token_id=None, pad_token_id=None)
    return GPT2LMHeadModel(config)


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


def p_keep_at(step: int, total_steps: int, start: float = 0.5, end: float = 0.95) -> float:
    """``p_keep`` rising on a cosine from ``start`` at step 0 to ``end`` at the last step."""
    frac = min(max(step / max(1, total_steps), 0.0), 1.0)
    return end - (end - start) * 0.5 * (1 + math.cos(math.pi * frac))


def start_tokens(batch: int, num_codes: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1): the start token ``K``, or the class token ``K + 1 + label``."""
    if labels is None:
        return torch.full((batch, 1), num_codes, dtype=torch.long)
    return (num_codes + 1 + labels.long()).reshape(batch, 1)


def corrupt(tokens: torch.Tensor, p_keep: float, num_codes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each token with probability ``p_keep``, else a uniformly random code (DiVeQ Sec. A.2)."""
    keep = torch.rand(tokens.shape, generator=generator, device=tokens.device) < p_keep
    noise = torch.randint(0, num_codes, tokens.shape, generator=generator, device=tokens.device)
    return torch.where(keep, tokens, noise)


def training_pair(seq: torch.Tensor, num_codes: int, p_keep: float, labels: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): inputs = [start, corrupted codes[:-1]], targets = the uncorrupted codes."""
    start = start_tokens(seq.shape[0], num_codes, labels).to(seq.device)
    inputs = torch.cat([start, corrupt(seq[:, :-1], p_keep, num_codes, generator)], dim=1)
    return inputs, seq


def generation_config(num_codes: int, vocab_size: int, top_k: int, temperature: float) -> GenerationConfig:
    """Top-k sampling restricted to code ids: start and class tokens are suppressed before top-k."""
    return GenerationConfig(do_sample=True, top_k=top_k, temperature=temperature, use_cache=True,
                            suppress_tokens=list(range(num_codes, vocab_size)), bos_token_id=num_codes,
                            pad_token_id=None, eos_token_id=None)


@torch.no_grad()
def sample_sequences(model: GPT2LMHeadModel, batch: int, num_codes: int, seq_len: int, top_k: int,
                     temperature: float = 1.0, generator: torch.Generator | None = None,
                     class_labels: torch.Tensor | None = None, use_cache: bool = True) -> torch.Tensor:
    """(B, seq_len) code ids sampled with ``generate`` (KV cache); seeded by ``generator`` when given.

    ``generate`` draws from the global RNG, so a generator is turned into a seed for a forked RNG:
    the same generator state gives the same samples and the caller's global RNG is untouched.
    """
    device = model.device
    prompt = start_tokens(batch, num_codes, class_labels).to(device)
    gen_cfg = generation_config(num_codes, model.config.vocab_size, top_k, temperature)
    gen_cfg.update(use_cache=use_cache, max_new_tokens=seq_len, min_new_tokens=seq_len)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else None
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(prompt, generation_config=gen_cfg, attention_mask=torch.ones_like(prompt))
    return out[:, 1:]
