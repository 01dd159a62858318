"""``VQGPTPipeline``: a GPT prior over VQ tokens plus the tokenizer that decodes them, as a diffusers pipeline."""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from stage2_prior.gpt import sample_sequences, sequence_to_codes


class VQGPTPipeline(DiffusionPipeline):
    """Components ``vqvae`` (a stock ``VQModel``, or our ``VQTokenizer`` for variants it cannot express) and
    ``transformer`` (``GPT2LMHeadModel``); the sampling settings are part of the pipeline config."""

    model_cpu_offload_seq = "transformer->vqvae"

    # the settings have defaults because diffusers treats parameters without one as components
    def __init__(self, vqvae, transformer, num_codes: int | None = None, grid: list[int] | None = None,
                 top_k: int | None = None, temperature: float = 1.0, num_classes: int = 0):
        super().__init__()
        if num_codes is None or not grid or top_k is None:
            raise ValueError("VQGPTPipeline needs num_codes, grid ((h, w) or (L, h, w)) and top_k")
        self.register_modules(vqvae=vqvae, transformer=transformer)
        self.register_to_config(num_codes=int(num_codes), grid=list(grid), top_k=int(top_k),
                                temperature=float(temperature), num_classes=int(num_classes))
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
                 output_type: str = "pil", return_dict: bool = True):
        """Sample ``batch_size`` images; ``class_labels`` (one per image) for class-conditional priors."""
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
        seq = sample_sequences(self.transformer, batch_size, cfg.num_codes, self.seq_len, top_k,
                               cfg.temperature if temperature is None else temperature, generator, class_labels)
        image = self.decode_codes(sequence_to_codes(seq, tuple(cfg.grid)).to(self.device))
        image = self.image_processor.postprocess(image.float(), output_type=output_type)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
