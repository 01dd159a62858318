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
from transformers import GPT2Config, GPT2LMHeadModel

from .config import GPTConfig
from .labels import drop_labels
from .vqgpt_pipeline import start_tokens


def build_gpt(cfg: GPTConfig, num_codes: int, seq_len: int, num_classes: int = 0) -> GPT2LMHeadModel:
    """A GPT-2 with vocabulary K + 1 (+ classes) and room for the start token plus ``seq_len`` codes."""
    config = GPT2Config(vocab_size=num_codes + 1 + num_classes, n_positions=seq_len + 1, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                        attn_pdrop=cfg.dropout, bos_token_id=num_codes, eos_token_id=None, pad_token_id=None,
                        tie_word_embeddings=cfg.tie_head)
    return GPT2LMHeadModel(config)


def p_keep_at(step: int, total_steps: int, start: float = 0.5, end: float = 0.95) -> float:
    """``p_keep`` rising on a cosine from ``start`` at step 0 to ``end`` at the last step."""
    frac = min(max(step / max(1, total_steps), 0.0), 1.0)
    return end - (end - start) * 0.5 * (1 + math.cos(math.pi * frac))


def corrupt(tokens: torch.Tensor, p_keep: float, num_codes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each token with probability ``p_keep``, else a uniformly random code (DiVeQ Sec. A.2)."""
    keep = torch.rand(tokens.shape, generator=generator, device=tokens.device) < p_keep
    noise = torch.randint(0, num_codes, tokens.shape, generator=generator, device=tokens.device)
    return torch.where(keep, tokens, noise)


def training_pair(seq: torch.Tensor, num_codes: int, p_keep: float, labels: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, label_dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): inputs = [start or class token, corrupted codes[:-1]], targets = the uncorrupted codes;
    labels dropped to the null class with probability ``label_dropout``."""
    if labels is not None and label_dropout > 0:
        labels = drop_labels(labels, label_dropout, generator)
    start = start_tokens(seq.shape[0], num_codes, labels).to(seq.device)
    inputs = torch.cat([start, corrupt(seq[:, :-1], p_keep, num_codes, generator)], dim=1)
    return inputs, seq
