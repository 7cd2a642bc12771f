"""Arc2Face: Stable Diffusion conditioned on a face-recognition embedding (Papantoniou et al., 2024).

The prompt "photo of a id person" is tokenised; the input embedding of the "id" token is replaced
by the identity embedding (unit norm, zero-padded to the text encoder's width) and the CLIP text
encoder runs on those input embeddings. Its output conditions the UNet through cross-attention;
25 DPM-Solver++ steps with classifier-free guidance 3.0 render the image. With the LCM-LoRA fused
into a second copy of the UNet, `render(..., fast=True)` takes 4 LCM steps without guidance.

On-disk layout (the published one): `arc2face/` the UNet (config.json and
diffusion_pytorch_model.safetensors) and `encoder/` the CLIP text encoder (config.json and
pytorch_model.bin as FoivosPar/Arc2Face publishes it, saved by transformers 4 with `text_model.`
key prefixes, or model.safetensors), plus the Stable Diffusion 1.5 parts `vae/`, `tokenizer/` and
`scheduler/`, in the same directory or in a separate `base` directory. The tiny preset
(`build_tiny`) uses the same layout with small configs.

Unconditional context for guidance: the empty prompt "" through the same tokenizer and text
encoder, as diffusers' StableDiffusionPipeline makes it when Arc2Face's published code passes only
`prompt_embeds`; it is computed once per generator. The UNet and VAE load strictly: a checkpoint
whose keys or shapes differ from its config is refused, never filled with fresh weights.

Randomness: each image's initial latent and (in fast mode) its re-noising between LCM steps come
from that image's own portable `models.seeding.Stream`, so the same seed gives the same draws on
every machine; nothing draws from torch's global RNG or a `torch.Generator`.

GPU use: weights in float16/bfloat16 (`dtype`), optional channels_last memory layout, the
diffusers default scaled-dot-product attention, the guided and unguided halves in one UNet call,
and an optional `torch.compile` of the UNet (`compile_unet`); `max_batch` bounds the memory of a
large render by splitting it into chunks.
"""

from __future__ import annotations

import copy
import inspect
import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, LCMScheduler, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.masking_utils import create_causal_mask

from models.generators.clip_vocab import write_clip_vocab
from models.generators.lcm_lora import (
    FAST_GUIDANCE,
    FAST_STEPS,
    lcm_denoise,
    lcm_renoise,
    lcm_scheduler,
    load_lcm_lora,
)
from models.seeding import Stream, make_generator, seeded_construction

PROMPT = "photo of a id person"  # Arc2Face's fixed prompt; "id" is the placeholder token
NEGATIVE_PROMPT = ""  # the unconditional prompt: diffusers' default when no negative prompt is given
ID_TOKEN = "id"  # the word whose input embedding is replaced by the identity embedding
# Stable Diffusion 1.5's scheduler/scheduler_config.json, as published (a PNDM config).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# Sub-directories of an Arc2Face model directory.
UNET_DIR, ENCODER_DIR, VAE_DIR, TOKENIZER_DIR, SCHEDULER_DIR = (
    "arc2face",
    "encoder",
    "vae",
    "tokenizer",
    "scheduler",
)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # weight dtypes from_pretrained accepts
# Files of each part: (sub-directory, alternative file names, what goes there).
ARC2FACE_FILES = (
    (UNET_DIR, ("config.json",), "the Arc2Face UNet config (FoivosPar/Arc2Face)"),
    (UNET_DIR, ("diffusion_pytorch_model.safetensors",), "the Arc2Face UNet weights (FoivosPar/Arc2Face)"),
    (ENCODER_DIR, ("config.json",), "the Arc2Face CLIP text encoder config (FoivosPar/Arc2Face)"),
    (
        ENCODER_DIR,
        ("model.safetensors", "pytorch_model.bin"),
        "the Arc2Face CLIP text encoder weights (FoivosPar/Arc2Face encoder/pytorch_model.bin)",
    ),
)
SD15_FILES = (
    (VAE_DIR, ("config.json",), "the Stable Diffusion 1.5 VAE config"),
    (VAE_DIR, ("diffusion_pytorch_model.safetensors",), "the Stable Diffusion 1.5 VAE weights"),
    (TOKENIZER_DIR, ("vocab.json",), "the Stable Diffusion 1.5 CLIP tokenizer vocabulary"),
    (TOKENIZER_DIR, ("merges.txt",), "the Stable Diffusion 1.5 CLIP tokenizer merges"),
    (TOKENIZER_DIR, ("tokenizer_config.json",), "the Stable Diffusion 1.5 CLIP tokenizer config"),
    (SCHEDULER_DIR, ("scheduler_config.json",), "the Stable Diffusion 1.5 noise schedule"),
)
V4_PREFIX = "text_model."  # transformers 4 saved CLIPTextModel keys under this prefix
V4_BUFFERS = ("embeddings.position_ids",)  # buffers that transformers < 4.31 also saved


@dataclass(frozen=True)
class Sampling:
    steps: int  # denoising steps per image
    guidance_scale: float  # classifier-free guidance scale; 1 = off (one UNet pass per step)


STANDARD = Sampling(steps=25, guidance_scale=3.0)  # DPM-Solver++ (2nd order), the published settings
FAST = Sampling(steps=FAST_STEPS, guidance_scale=FAST_GUIDANCE)  # LCM with the LCM-LoRA


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


def check_layout(path: Path, base: Path) -> None:
    """Raise FileNotFoundError naming every missing file of the layout and what goes there."""
    missing = []
    for root, files in ((path, ARC2FACE_FILES), (base, SD15_FILES)):
        for sub, names, what in files:
            if not any((root / sub / n).is_file() for n in names):
                missing.append(f"{' or '.join(str(root / sub / n) for n in names)}: {what}")
    if missing:
        raise FileNotFoundError("Arc2Face model files missing:\n  " + "\n  ".join(missing))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a plain `.bin` state dict (no code-running pickle)."""
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not a plain state dict; refusing a pickle that runs code ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors")
    return state


def load_text_encoder(directory: Path, dtype: torch.dtype = torch.float32) -> CLIPTextModel:
    """The CLIP text encoder of `directory` (config.json + model.safetensors or pytorch_model.bin).

    Reads checkpoints saved by transformers 4 (`text_model.`-prefixed keys, a wrapper class in
    `architectures`) as well as by transformers 5; every weight must be present, none left over.
    """
    raw = json.loads((directory / "config.json").read_text("utf-8"))
    if raw.get("model_type") != "clip_text_model":
        raise ValueError(
            f"{directory / 'config.json'}: model_type {raw.get('model_type')!r}, expected 'clip_text_model'"
        )
    skip = {"architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype"}
    config = CLIPTextConfig.from_dict({k: v for k, v in raw.items() if k not in skip})
    weights = directory / "model.safetensors"
    state = read_state_dict(weights if weights.is_file() else directory / "pytorch_model.bin")
    state = {k.removeprefix(V4_PREFIX): v for k, v in state.items()}
    for k in V4_BUFFERS:
        state.pop(k, None)
    with seeded_construction(0):  # every weight is overwritten below; the seed only keeps the RNG untouched
        model = CLIPTextModel(config)
    expected = model.state_dict()
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"{directory}: text encoder weights missing {missing[:8]}, unexpected {extra[:8]}")
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{directory}: text encoder weight shapes differ from config.json for {wrong[:8]}")
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def _first(names: list[str], n: int = 8) -> list[str]:
    """At most `n` names, then how many more (a wrong model's file can differ in hundreds of keys)."""
    return names if len(names) <= n else [*names[:n], f"... and {len(names) - n} more"]


def load_diffusers_model(cls: type[ModelMixin], directory: Path, dtype: torch.dtype = torch.float32) -> Any:
    """A diffusers model (`cls`: UNet2DConditionModel, AutoencoderKL) from config.json and
    diffusion_pytorch_model.safetensors in `directory`, every weight read from the file.

    diffusers' `from_pretrained` leaves a weight that the file lacks (a missing or renamed key) at
    whatever the constructor left there and drops a key the model lacks, with a logged warning
    only. Here either, or a weight whose shape differs from the config's, is a ValueError naming
    the keys. diffusers' own renaming of old checkpoints (the VAE's pre-0.14 attention names
    `query`/`key`/`value`/`proj_attn`) still applies before the comparison.
    """
    model, info = cls.from_pretrained(
        directory,
        use_safetensors=True,
        local_files_only=True,
        torch_dtype=dtype,
        low_cpu_mem_usage=False,  # a model built in full; with True, missing weights would stay on "meta"
        ignore_mismatched_sizes=True,  # misshapen weights: in the loading info, not a RuntimeError
        output_loading_info=True,
    )
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    misshapen = [
        f"{k}: expected {tuple(want)}, found {tuple(got)}" for k, got, want in sorted(info["mismatched_keys"])
    ]
    problems = [
        f"{label} keys {_first(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
        if keys
    ]
    if problems or info["error_msgs"]:
        weights = directory / "diffusion_pytorch_model.safetensors"
        details = ", ".join(problems + [str(m) for m in info["error_msgs"]])
        raise ValueError(f"{weights}: weights do not match {cls.__name__} of config.json: {details}")
    return model


def read_scheduler_config(directory: Path) -> dict[str, Any]:
    """The noise schedule's config as saved (SD 1.5 publishes a PNDMScheduler config)."""
    return dict(json.loads((directory / "scheduler_config.json").read_text("utf-8")))


def dpm_solver(config: Mapping[str, Any]) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2nd order, multistep) on the noise schedule of any scheduler config."""
    accepted = set(inspect.signature(DPMSolverMultistepScheduler.__init__).parameters)
    kept = {k: v for k, v in config.items() if k in accepted}
    kept.update(algorithm_type="dpmsolver++", solver_order=2)
    return DPMSolverMultistepScheduler.from_config(kept)


class Arc2FaceGenerator:
    """Renders face images from identity embeddings: `render(embeddings, seeds) -> uint8 images`.

    `fast_unet` (the UNet with the LCM-LoRA fused in) and `fast_scheduler` (an LCMScheduler) enable
    `fast=True`; the standard UNet is kept alongside, so both modes are served by one generator (at
    twice the UNet memory). `scheduler` must not draw noise in its step (DPM-Solver++ does not; its
    SDE variants would, and are refused). `channels_last` stores the UNets and VAE in NHWC;
    `compile_unet` compiles the UNets.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: SchedulerMixin,
        embedding_dim: int = 512,
        *,
        fast_unet: UNet2DConditionModel | None = None,
        fast_scheduler: SchedulerMixin | None = None,
        channels_last: bool = False,
        compile_unet: bool = False,
    ) -> None:
        width = text_encoder.config.hidden_size
        if embedding_dim > width:
            raise ValueError(f"embedding_dim: {embedding_dim} exceeds the text encoder width {width}")
        if (fast_unet is None) != (fast_scheduler is None):
            raise ValueError("fast_unet, fast_scheduler: give both (fast mode) or neither")
        if fast_scheduler is not None and not isinstance(fast_scheduler, LCMScheduler):
            raise ValueError(f"fast_scheduler: expected an LCMScheduler, got {type(fast_scheduler).__name__}")
        if "sde" in str(getattr(scheduler.config, "algorithm_type", "")):
            kind = scheduler.config.algorithm_type
            raise ValueError(f"scheduler: {kind} draws noise in its step; use dpmsolver++")
        self.unet = unet.eval().requires_grad_(False)
        self.fast_unet = fast_unet.eval().requires_grad_(False) if fast_unet is not None else None
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler = scheduler  # a template: each render works on its own copy
        self.fast_scheduler = fast_scheduler  # the same for fast mode
        self.embedding_dim = embedding_dim
        if channels_last:
            for module in (self.unet, self.fast_unet, self.vae):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        self._denoisers: dict[bool, Any] = {False: self.unet, True: self.fast_unet}  # fast -> UNet callable
        if compile_unet:
            self.compile_unet()
        ids = tokenizer(
            PROMPT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
        ).input_ids
        id_token = tokenizer.encode(ID_TOKEN, add_special_tokens=False)
        if len(id_token) != 1 or ids.count(id_token[0]) != 1:
            raise ValueError(f"tokenizer: {ID_TOKEN!r} must be one token, once in {PROMPT!r}")
        self.prompt_ids = torch.tensor(ids, device=self.device)  # [L]
        self.id_position = ids.index(id_token[0])  # index of the "id" token in the prompt
        self.unconditional_context = self.encode_negative_prompt()  # [1, L, H], computed once

    @torch.no_grad()
    def encode_negative_prompt(self, prompt: str = NEGATIVE_PROMPT) -> torch.Tensor:
        """The unconditional context [1, L, H]: `prompt` ("" by default) through tokenizer and text encoder.

        This is what diffusers' StableDiffusionPipeline encodes as the negative prompt when, as in
        Arc2Face's published inference code, it is given only `prompt_embeds`: the text padded to the
        prompt's length and run through the text encoder's own forward on token ids.

        A zero identity in place of "id" would be another unconditional input (the previous choice
        here); it is not kept as an option, since the published model's images are the ones made with
        the empty prompt and nothing shows the other to be better.
        """
        length = len(self.prompt_ids)
        tokens = self.tokenizer(prompt, padding="max_length", max_length=length, truncation=True)
        ids = torch.tensor([tokens.input_ids], device=self.device)  # [1, L]
        return self.text_encoder(input_ids=ids).last_hidden_state  # [1, L, H]

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

    @property
    def has_fast_mode(self) -> bool:
        return self.fast_unet is not None

    def compile_unet(self, **options: Any) -> None:
        """Run the UNet(s) through `torch.compile(unet, **options)` (default: inductor, static shapes).

        Each distinct batch size compiles once; keep `max_batch` fixed so chunks reuse one graph.
        """
        options = {"dynamic": False, **options}
        self._denoisers = {
            fast: torch.compile(unet, **options) if unet is not None else None
            for fast, unet in ((False, self.unet), (True, self.fast_unet))
        }

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        base: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        lcm_lora: str | Path | None = None,
        channels_last: bool = False,
        compile_unet: bool = False,
    ) -> Arc2FaceGenerator:
        """Assemble the pipeline from the published layout (see the module docstring) onto `device`.

        `base` is the Stable Diffusion 1.5 directory holding vae/, tokenizer/ and scheduler/ (default:
        `path` itself). `lcm_lora` is the LCM-LoRA `pytorch_lora_weights.safetensors`, fused into a
        copy of the UNet for fast mode. The scheduler config (SD 1.5's is PNDM) gives the noise
        schedule for DPM-Solver++ and LCM. Weights load from safetensors or plain state dicts only.
        """
        path = Path(path)
        base_dir = Path(base) if base is not None else path
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
        if not path.is_dir():
            raise FileNotFoundError(f"path: {path} is not a directory (Arc2Face: arc2face/, encoder/)")
        if not base_dir.is_dir():
            raise FileNotFoundError(f"base: {base_dir} is not a directory (SD 1.5 vae, tokenizer, scheduler)")
        check_layout(path, base_dir)
        unet = load_diffusers_model(UNet2DConditionModel, path / UNET_DIR, dtype).to(device)
        vae = load_diffusers_model(AutoencoderKL, base_dir / VAE_DIR, dtype).to(device)
        text_encoder = load_text_encoder(path / ENCODER_DIR, dtype).to(device)
        tokenizer = CLIPTokenizer.from_pretrained(base_dir / TOKENIZER_DIR)
        schedule = read_scheduler_config(base_dir / SCHEDULER_DIR)
        fast_unet, fast_scheduler = None, None
        if lcm_lora is not None:
            fast_unet = copy.deepcopy(unet)
            load_lcm_lora(lcm_lora, fast_unet)
            fast_scheduler = lcm_scheduler(schedule)
        return cls(
            unet, vae, text_encoder, tokenizer, dpm_solver(schedule),
            fast_unet=fast_unet, fast_scheduler=fast_scheduler,
            channels_last=channels_last, compile_unet=compile_unet,
        )  # fmt: skip

    @torch.no_grad()
    def encode_identities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings for identity embeddings [B, D] -> [B, L, H] (the UNet's context).

        Each embedding is normalised to unit length (a zero vector stays zero), zero-padded to the
        text width, and put in place of the "id" token. These are the `prompt_embeds` Arc2Face's
        published code gives diffusers' StableDiffusionPipeline.
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

    def _seeded_latents(self, seeds: Sequence[int]) -> tuple[torch.Tensor, list[Stream]]:
        """Initial latents [B, C, h, w] and each image's portable stream, positioned after its latent."""
        c, s = self.unet.config.in_channels, self.unet.config.sample_size
        generators = [make_generator(seed) for seed in seeds]
        latents = [g.normal(c, s, s) for g in generators]  # B x [C, h, w], float32, the same bits everywhere
        return torch.stack(latents).to(self.device, self.dtype), generators  # [B, C, h, w]

    def initial_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """One latent per seed, each from its own CPU generator (device-independent): [B, C, h, w]."""
        return self._seeded_latents(seeds)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> uint8 images [B, H, W, 3] on the CPU."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample  # [B, 3, H, W] in [-1, 1]
        images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu()  # [B, H, W, 3]

    def _settings(
        self,
        embeddings: torch.Tensor,
        seeds: Sequence[int],
        steps: int | None,
        guidance_scale: float | None,
        fast: bool,
        max_batch: int | None,
    ) -> tuple[int, float, int]:
        """Check a render's arguments; (steps, guidance_scale, chunk size) with the defaults filled in."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings: expected [B, {self.embedding_dim}], got {tuple(embeddings.shape)}")
        b = embeddings.shape[0]
        if len(seeds) != b:
            raise ValueError(f"seeds: expected {b} seeds (one per embedding), got {len(seeds)}")
        if fast and not self.has_fast_mode:
            raise ValueError("fast: fast mode needs the LCM-LoRA (from_pretrained(..., lcm_lora=path))")
        defaults = FAST if fast else STANDARD
        steps = defaults.steps if steps is None else steps
        guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: must be an int >= 1, got {steps!r}")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale: must be >= 0, got {guidance_scale}")
        bad_max_batch = isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
        if max_batch is not None and bad_max_batch:
            raise ValueError(f"max_batch: must be None or an int >= 1, got {max_batch!r}")
        return steps, guidance_scale, max_batch or max(b, 1)

    @torch.no_grad()
    def render(
        self,
        embeddings: torch.Tensor,
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        fast: bool = False,
        max_batch: int | None = None,
    ) -> torch.Tensor:
        """Images for identity embeddings [B, D] and one seed each: uint8 [B, H, W, 3] on the CPU.

        Image b depends only on (embeddings[b], seeds[b], steps, guidance_scale, fast), not on the
        rest of the batch (up to float rounding). `fast` uses the LCM-LoRA UNet and LCM sampling
        (defaults 4 steps, guidance 1); otherwise DPM-Solver++ (defaults 25 steps, guidance 3).
        guidance_scale 1 disables classifier-free guidance. `max_batch` renders at most that many
        images at once (the UNet sees twice as many with guidance), in order, to bound memory.
        """
        steps, guidance_scale, chunk = self._settings(
            embeddings, seeds, steps, guidance_scale, fast, max_batch
        )
        b = embeddings.shape[0]
        if b == 0:
            return torch.empty(0, self.image_size, self.image_size, 3, dtype=torch.uint8)
        sampling = (steps, guidance_scale, fast)
        images = [  # chunks x [n, H, W, 3]
            self.decode(self._denoise(embeddings[i : i + chunk], seeds[i : i + chunk], *sampling))
            for i in range(0, b, chunk)
        ]
        return torch.cat(images)  # [B, H, W, 3]

    @torch.no_grad()
    def final_latents(
        self,
        embeddings: torch.Tensor,
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        fast: bool = False,
        max_batch: int | None = None,
    ) -> torch.Tensor:
        """The latents `render` decodes, for the same arguments: [B, C, h, w] on the device."""
        steps, guidance_scale, chunk = self._settings(
            embeddings, seeds, steps, guidance_scale, fast, max_batch
        )
        b = embeddings.shape[0]
        c, s = self.unet.config.in_channels, self.unet.config.sample_size
        if b == 0:
            return torch.empty(0, c, s, s, device=self.device, dtype=self.dtype)
        parts = [
            self._denoise(embeddings[i : i + chunk], seeds[i : i + chunk], steps, guidance_scale, fast)
            for i in range(0, b, chunk)
        ]
        return torch.cat(parts)  # [B, C, h, w]

    def _denoise(
        self, embeddings: torch.Tensor, seeds: Sequence[int], steps: int, guidance_scale: float, fast: bool
    ) -> torch.Tensor:
        """The sampling loop for one chunk: final latents [b, C, h, w]."""
        b = embeddings.shape[0]
        guided = guidance_scale != 1.0
        context = self.encode_identities(embeddings).to(self.dtype)  # [b, L, H]
        if guided:  # unconditional first, as diffusers' pipeline orders the halves
            uncond = self.unconditional_context.to(self.dtype).expand(b, -1, -1)  # [b, L, H]
            context = torch.cat([uncond, context])  # [2b, L, H]
        template = self.fast_scheduler if fast else self.scheduler
        scheduler = type(template).from_config(template.config)
        scheduler.set_timesteps(steps, device=self.device)
        latents, streams = self._seeded_latents(seeds)  # [b, C, h, w]
        latents = latents * scheduler.init_noise_sigma
        denoiser = self._denoisers[fast]
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            x = torch.cat([latents, latents]) if guided else latents  # [2b or b, C, h, w]
            x = scheduler.scale_model_input(x, t)
            eps = denoiser(x, t, encoder_hidden_states=context).sample  # [2b or b, C, h, w]
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # [b, C, h, w]
            if not fast:
                latents = scheduler.step(eps, t, latents).prev_sample
                continue
            latents = lcm_denoise(scheduler, eps, t, latents)  # the clean estimate; the last step's is final
            if i + 1 < len(timesteps):
                # LCM re-noises to the next timestep: image j draws its noise from its own stream, in order
                noise = torch.stack([g.normal(*latents.shape[1:]) for g in streams])  # [b, C, h, w], CPU
                noise = noise.to(latents.device, latents.dtype)
                latents = lcm_renoise(scheduler, latents, noise, timesteps[i + 1])
        return latents  # [b, C, h, w]


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
