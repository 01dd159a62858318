"""``ClassConditionalLDMPipeline``: ``diffusers.LDMPipeline`` with class labels and classifier-free guidance.

A class-conditional UNet (``UNet2DModel(num_class_embeds = n + 1)``, the last class the null one) is not a stock
``LDMPipeline``, whose loop passes no labels. This file is self-contained on purpose (torch and diffusers only):
export copies it into the pipeline folder, so ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``
runs exactly this code in a Python without vqgen. With ``guidance_scale`` 1 and no labels given it samples as
``LDMPipeline`` would, labels drawn uniformly.
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


def guided_output(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on the UNet's output, epsilon or v alike: ``u + s (c - u)``."""
    return uncond + scale * (cond - uncond)


class ClassConditionalLDMPipeline(DiffusionPipeline):
    """Components ``vqvae``, ``unet`` (with ``num_class_embeds``), ``scheduler``; ``num_classes`` real classes,
    the null class ``num_classes``; ``id2label`` names them."""

    model_cpu_offload_seq = "unet->vqvae"

    # the settings have defaults because diffusers treats parameters without one as components
    def __init__(self, vqvae, unet, scheduler, num_classes: int = 0, guidance_scale: float = 1.0,
                 id2label: dict | None = None):
        super().__init__()
        if unet.config.num_class_embeds != num_classes + 1:
            raise ValueError(f"the UNet has {unet.config.num_class_embeds} class embeddings; a pipeline of "
                             f"{num_classes} classes needs {num_classes + 1} (the last one null)")
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)
        self.register_to_config(num_classes=int(num_classes), guidance_scale=float(guidance_scale),
                                id2label={str(k): v for k, v in (id2label or {}).items()})

    def denoise(self, latents: torch.Tensor, labels: torch.Tensor, scale: float, t) -> torch.Tensor:
        """The UNet's (guided) output at step ``t``: one pass with ``scale`` 1, else ``[x; x]`` with ``[y; null]``."""
        x = self.scheduler.scale_model_input(latents, t)
        if scale == 1.0:
            return self.unet(x, t, class_labels=labels).sample
        null = torch.full_like(labels, self.config.num_classes)
        both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.chunk(2)
        return guided_output(cond, uncond, scale)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels: torch.Tensor | list[int] | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None, eta: float = 0.0,
                 num_inference_steps: int = 50, output_type: str = "pil", return_dict: bool = True):
        """Sample ``batch_size`` images of ``class_labels`` (one per image; uniform when None), guided by
        ``guidance_scale`` (the config's when None; 1: no guidance, 0: the unconditional model)."""
        n = self.config.num_classes
        if class_labels is None:
            class_labels = torch.randint(0, n, (batch_size,), generator=generator)
        class_labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if len(class_labels) != batch_size or class_labels.min() < 0 or class_labels.max() >= n:
            raise ValueError(f"need {batch_size} class labels in [0, {n})")
        scale = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        size = self.unet.config.sample_size
        latents = randn_tensor((batch_size, self.unet.config.in_channels, size, size), generator=generator)
        latents = latents.to(self.device) * self.scheduler.init_noise_sigma
        labels = class_labels.to(self.device)
        self.scheduler.set_timesteps(num_inference_steps)
        extra = {"eta": eta} if isinstance(self.scheduler, DDIMScheduler) else {}  # as LDMPipeline: DDIM's eta
        for t in self.progress_bar(self.scheduler.timesteps):
            latents = self.scheduler.step(self.denoise(latents, labels, scale, t), t, latents, **extra).prev_sample
        image = self.vqvae.decode(latents / self.vqvae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
