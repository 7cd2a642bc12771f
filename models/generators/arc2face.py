"""Arc2Face: Stable Diffusion conditioned on a face-recognition embedding (Papantoniou et al., 2024).

The prompt "photo of a id person" is tokenised; the input embedding of the "id" token is replaced
by the identity embedding (unit norm, zero-padded to the text encoder's width) and the CLIP text
encoder runs on those input embeddings. Its output conditions the UNet through cross-attention;
25 DPM-Solver++ steps with classifier-free guidance 3.0 render the image.

On-disk layout (the published one): `arc2face/` the UNet and `encoder/` the CLIP text encoder
(`save_pretrained` formats), plus the Stable Diffusion 1.5 parts `vae/`, `tokenizer/` and
`scheduler/`. The tiny preset (`build_tiny`) uses the same layout with small configs.

Unconditional embeddings for guidance: the same prompt with a zero identity embedding. The
published demo encodes an empty negative prompt instead; the zero identity keeps the prompt's
text fixed so that guidance pushes along the identity only, and needs no second tokenisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.masking_utils import create_causal_mask

from models.generators.clip_vocab import write_clip_vocab
from models.seeding import make_generator, seeded_construction

PROMPT = "photo of a id person"  # Arc2Face's fixed prompt; "id" is the placeholder token
ID_TOKEN = "id"  # the word whose input embedding is replaced by the identity embedding
# Sub-directories of an Arc2Face model directory.
UNET_DIR, ENCODER_DIR, VAE_DIR, TOKENIZER_DIR, SCHEDULER_DIR = (
    "arc2face",
    "encoder",
    "vae",
    "tokenizer",
    "scheduler",
)


@dataclass(frozen=True)
class TinyArc2FaceConfig:
    text_width: int = 512  # CLIP hidden size; >= the 512-d identity embedding, which is zero-padded to it
    text_layers: int = 2  # CLIP transformer layers
    text_heads: int = 4  # CLIP attention heads
    text_mlp: int = 1024  # CLIP MLP hidden size
    max_length: int = 77  # tokenizer and position-table length, as in SD 1.5
    unet_channels: tuple[int, ...] = (32, 64)  # UNet block widths, one per resolution
    unet_head_dim: int = 8  # UNet attention head dimension
    latent_size: int = 8  # latent height = width; image size = latent_size * 2 ** (len(vae_channels) - 1)
    vae_channels: tuple[int, ...] = (32, 64, 64)  # VAE block widths; the VAE downsamples len - 1 times
    latent_channels: int = 4  # as in SD 1.5


def encode_prompt_embeds(text_encoder: CLIPTextModel, token_embeds: torch.Tensor) -> torch.Tensor:
    """Run a CLIP text encoder on input token embeddings [B, L, H] -> last hidden states [B, L, H].

    transformers 5's `CLIPTextModel.forward` takes only `input_ids`, so this mirrors it on the
    sub-modules: position embeddings, causal self-attention layers, final layer norm.
    """
    hidden = text_encoder.embeddings(inputs_embeds=token_embeds)  # [B, L, H]
    mask = create_causal_mask(
        config=text_encoder.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None
    )
    hidden = text_encoder.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
    return text_encoder.final_layer_norm(hidden)  # [B, L, H]


class Arc2FaceGenerator:
    """Renders face images from identity embeddings: `render(embeddings, seeds) -> uint8 images`."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DPMSolverMultistepScheduler,
        embedding_dim: int = 512,
    ) -> None:
        width = text_encoder.config.hidden_size
        if embedding_dim > width:
            raise ValueError(f"embedding_dim: {embedding_dim} exceeds the text encoder width {width}")
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler = scheduler  # a template: each render works on its own copy
        self.embedding_dim = embedding_dim
        ids = tokenizer(
            PROMPT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
        ).input_ids
        id_token = tokenizer.encode(ID_TOKEN, add_special_tokens=False)
        if len(id_token) != 1 or ids.count(id_token[0]) != 1:
            raise ValueError(f"tokenizer: {ID_TOKEN!r} must be one token, once in {PROMPT!r}")
        self.prompt_ids = torch.tensor(ids, device=self.device)  # [L]
        self.id_position = ids.index(id_token[0])  # index of the "id" token in the prompt

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def image_size(self) -> int:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.unet.config.sample_size) * factor

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> Arc2FaceGenerator:
        """Load the published Arc2Face layout (safetensors weights only) onto `device`."""
        path = Path(path)
        safe = {"use_safetensors": True, "torch_dtype": dtype, "low_cpu_mem_usage": False}
        unet = UNet2DConditionModel.from_pretrained(path / UNET_DIR, **safe)
        vae = AutoencoderKL.from_pretrained(path / VAE_DIR, **safe)
        text_encoder = CLIPTextModel.from_pretrained(path / ENCODER_DIR, use_safetensors=True, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path / TOKENIZER_DIR)
        scheduler = DPMSolverMultistepScheduler.from_pretrained(path / SCHEDULER_DIR)
        return cls(unet.to(device), vae.to(device), text_encoder.to(device), tokenizer, scheduler)

    @torch.no_grad()
    def encode_identities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings for identity embeddings [B, D] -> [B, L, H] (the UNet's context).

        Each embedding is normalised to unit length (a zero vector stays zero: the unconditional
        input), zero-padded to the text width, and put in place of the "id" token.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings: expected [B, {self.embedding_dim}], got {tuple(embeddings.shape)}")
        b = embeddings.shape[0]
        width = self.text_encoder.config.hidden_size
        emb = embeddings.to(self.device, torch.float32)
        emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [B, D]
        emb = torch.nn.functional.pad(emb, (0, width - self.embedding_dim))  # [B, H]
        table = self.text_encoder.get_input_embeddings()
        tokens = table(self.prompt_ids)[None].expand(b, -1, -1).clone()  # [B, L, H]
        tokens[:, self.id_position] = emb.to(tokens.dtype)
        return encode_prompt_embeds(self.text_encoder, tokens)  # [B, L, H]

    def initial_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """One latent per seed, each from its own CPU generator (device-independent): [B, C, h, w]."""
        c, s = self.unet.config.in_channels, self.unet.config.sample_size
        latents = [  # B x [C, h, w]
            torch.randn(c, s, s, generator=make_generator(seed), dtype=torch.float32) for seed in seeds
        ]
        return torch.stack(latents).to(self.device, self.dtype)  # [B, C, h, w]

    @torch.no_grad()
    def render(
        self,
        embeddings: torch.Tensor,
        seeds: Sequence[int],
        *,
        steps: int = 25,
        guidance_scale: float = 3.0,
    ) -> torch.Tensor:
        """Images for identity embeddings [B, D] and one seed each: uint8 [B, H, W, 3] on the CPU.

        Image b depends only on (embeddings[b], seeds[b], steps, guidance_scale), not on the rest
        of the batch (up to float rounding). guidance_scale 1 disables classifier-free guidance.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings: expected [B, {self.embedding_dim}], got {tuple(embeddings.shape)}")
        b = embeddings.shape[0]
        if len(seeds) != b:
            raise ValueError(f"seeds: expected {b} seeds (one per embedding), got {len(seeds)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: must be an int >= 1, got {steps!r}")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale: must be >= 0, got {guidance_scale}")
        if b == 0:
            return torch.empty(0, self.image_size, self.image_size, 3, dtype=torch.uint8)
        guided = guidance_scale != 1.0
        context = self.encode_identities(embeddings)  # [B, L, H]
        if guided:
            uncond = self.encode_identities(torch.zeros_like(embeddings[:1]))  # [1, L, H], the same for all
            context = torch.cat([uncond.expand(b, -1, -1), context])  # [2B, L, H]
        context = context.to(self.dtype)
        scheduler = DPMSolverMultistepScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        latents = self.initial_latents(seeds) * scheduler.init_noise_sigma  # [B, C, h, w]
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents]) if guided else latents  # [2B or B, C, h, w]
            x = scheduler.scale_model_input(x, t)
            eps = self.unet(x, t, encoder_hidden_states=context).sample  # [2B or B, C, h, w]
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # [B, C, h, w]
            latents = scheduler.step(eps, t, latents).prev_sample
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample  # [B, 3, H, W] in [-1, 1]
        images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu()  # [B, H, W, 3]


def build_tiny(path: str | Path, seed: int = 0, config: TinyArc2FaceConfig = TinyArc2FaceConfig()) -> Path:
    """Build the tiny preset from `seed` (global RNG untouched) and save it in the Arc2Face layout."""
    path = Path(path)
    write_clip_vocab(path / TOKENIZER_DIR, PROMPT.split(), model_max_length=config.max_length)
    tokenizer = CLIPTokenizer.from_pretrained(path / TOKENIZER_DIR)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_width,
        intermediate_size=config.text_mlp,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    n_blocks = len(config.unet_channels)
    with seeded_construction(seed):
        text_encoder = CLIPTextModel(text_config)
        unet = UNet2DConditionModel(
            sample_size=config.latent_size,
            in_channels=config.latent_channels,
            out_channels=config.latent_channels,
            down_block_types=("CrossAttnDownBlock2D",) * (n_blocks - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_blocks - 1),
            block_out_channels=config.unet_channels,
            layers_per_block=1,
            attention_head_dim=config.unet_head_dim,
            cross_attention_dim=config.text_width,
            norm_num_groups=min(32, config.unet_channels[0]),
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
            block_out_channels=config.vae_channels,
            layers_per_block=1,
            latent_channels=config.latent_channels,
            norm_num_groups=min(32, config.vae_channels[0]),
            sample_size=config.latent_size * 2 ** (len(config.vae_channels) - 1),
        )
    scheduler = DPMSolverMultistepScheduler(  # SD 1.5's noise schedule, DPM-Solver++ (2nd order)
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
        steps_offset=1,
    )
    unet.save_pretrained(path / UNET_DIR, safe_serialization=True)
    vae.save_pretrained(path / VAE_DIR, safe_serialization=True)
    text_encoder.save_pretrained(path / ENCODER_DIR, safe_serialization=True)
    scheduler.save_pretrained(path / SCHEDULER_DIR)
    return path
