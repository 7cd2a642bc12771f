"""Arc2Face: the tiny preset, the published pipeline's behaviour (diffusers' StableDiffusionPipeline
given only prompt_embeds), the published layout (transformers 4 encoder, separate SD 1.5 base, strict
UNet/VAE loading), LCM-LoRA fusion and fast mode, batching, and the GPU-oriented settings on the CPU."""

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from models import zoo
from models.generators.arc2face import (
    ARC2FACE_FILES,
    ENCODER_DIR,
    FAST,
    PROMPT,
    SCHEDULER_DIR,
    SD15_FILES,
    SD15_SCHEDULER_CONFIG,
    STANDARD,
    TOKENIZER_DIR,
    UNET_DIR,
    VAE_DIR,
    Arc2FaceGenerator,
    encode_prompt_embeds,
    load_diffusers_model,
    load_text_encoder,
)
from models.generators.lcm_lora import (
    fuse_lora,
    lcm_denoise,
    lcm_renoise,
    lcm_scheduler,
    load_lcm_lora,
    parse_lora,
)
from models.sampling.random import sample_identities
from models.seeding import make_generator

STEPS = 4  # enough solver steps to exercise DPM-Solver++'s multistep update, fast on a CPU


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The shipped tiny preset, copied and checked against its pins (models/presets)."""
    from models.registry import ensure_model

    return ensure_model("arc2face-tiny", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def generator(tiny_dir) -> Arc2FaceGenerator:
    return Arc2FaceGenerator.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def identities():
    return sample_identities(11, 0, 4)  # [4, 512]


def test_prompt_tokenises_with_one_id_token(generator):
    tok = generator.tokenizer
    tokens = tok.convert_ids_to_tokens(generator.prompt_ids.tolist())
    words = ["photo</w>", "of</w>", "a</w>", "id</w>", "person</w>"]
    assert tokens[:7] == ["<|startoftext|>", *words, "<|endoftext|>"]
    assert len(tokens) == tok.model_max_length == 77
    assert generator.id_position == 4 and PROMPT.split()[3] == "id"


def test_encoder_on_input_embeddings_matches_encoder_on_ids(generator):
    ids = generator.prompt_ids[None]  # [1, L]
    expected = generator.text_encoder(input_ids=ids).last_hidden_state
    got = encode_prompt_embeds(generator.text_encoder, generator.text_encoder.get_input_embeddings()(ids))
    assert torch.allclose(got, expected, atol=1e-6)


def test_id_token_is_replaced_by_the_embedding(generator, identities):
    ctx = generator.encode_identities(identities[:2])  # [2, L, H]
    p = generator.id_position
    assert ctx.shape == (2, 77, generator.text_encoder.config.hidden_size)
    # causal attention: tokens before "id" never see it; from "id" on, every position does
    assert torch.equal(ctx[0, :p], ctx[1, :p])
    assert ((ctx[0, p:] - ctx[1, p:]).abs().amax(dim=-1) > 1e-4).all()
    # the embedding is normalised before it goes in
    assert torch.allclose(generator.encode_identities(identities[:1] * 3.0), ctx[:1], atol=1e-5)


def test_render_shape_dtype_and_reproducible(generator, identities):
    images = generator.render(identities[:2], [5, 6], steps=STEPS)
    assert images.shape == (2, generator.image_size, generator.image_size, 3) == (2, 32, 32, 3)
    assert images.dtype == torch.uint8
    assert images.float().std() > 5  # not a blank image
    again = generator.render(identities[:2], [5, 6], steps=STEPS)
    assert torch.equal(images, again)


def changed_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a != b).float().mean().item()


def test_render_depends_on_seed_and_embedding(generator, identities):
    base = generator.render(identities[:1], [5], steps=STEPS)
    other_seed = generator.render(identities[:1], [7], steps=STEPS)
    other_identity = generator.render(identities[1:2], [5], steps=STEPS)
    assert (base.float() - other_seed.float()).abs().mean() > 10  # the seed sets the initial latent
    # the random tiny UNet is steered only weakly by its context, but across most of the image
    assert changed_fraction(base, other_identity) > 0.25


def test_render_independent_of_batch_neighbours(generator, identities):
    seeds = [21, 22, 23, 24]
    batch = generator.render(identities, seeds, steps=STEPS).int()
    singles = [generator.render(identities[b : b + 1], [s], steps=STEPS) for b, s in enumerate(seeds)]
    singles = torch.cat(singles).int()
    assert (batch - singles).abs().max() <= 2
    assert (batch - singles).abs().float().mean() < 0.05
    shuffled = generator.render(identities[[2, 0]], [23, 21], steps=STEPS).int()
    assert (shuffled - batch[[2, 0]]).abs().max() <= 2


def test_guidance_scale_changes_the_image(generator, identities):
    guided = generator.render(identities[:1], [5], steps=STEPS, guidance_scale=3.0)
    plain = generator.render(identities[:1], [5], steps=STEPS, guidance_scale=1.0)
    assert changed_fraction(guided, plain) > 0.2


def published_pipeline(gen: Arc2FaceGenerator) -> StableDiffusionPipeline:
    """diffusers' StableDiffusionPipeline on the generator's own components, as Arc2Face's code builds it."""
    pipe = StableDiffusionPipeline(
        vae=gen.vae, text_encoder=gen.text_encoder, tokenizer=gen.tokenizer, unet=gen.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(gen.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_standard_mode_is_the_published_pipeline_given_only_prompt_embeds(generator, identities):
    """Arc2Face's inference code calls pipeline(prompt_embeds=<encoded identity>, 25 steps, guidance 3);
    diffusers then encodes the empty prompt "" as the unconditional context. Same components, same
    initial latents: our latents and images must be the pipeline's.

    Tolerance: none for the denoising. Measured with ATEN_CPU_CAPABILITY=default and =avx2 (each in
    its own process, batch 1 and 3, 4 and 25 steps) the largest difference was 0.0 in the latents and
    0 in the images: both sides run the same kernels on the same batches in the same order. The one
    computation not shared, the unconditional text encoding (the pipeline's over a batch of B copies
    of "", ours once over one), is compared with a measured bound.
    """
    pipe = published_pipeline(generator)
    emb, seeds = identities[:2], [5, 6]
    cond = generator.encode_identities(emb)  # [2, L, H]: the published `prompt_embeds`
    _, negative = pipe.encode_prompt(None, generator.device, 1, True, prompt_embeds=cond)
    # The pipeline encodes "" over a batch of B copies, we once over one: the same kernels, but a
    # batch of another size may take another summation order. Measured (tiny encoder, B = 2):
    # 2.2e-6 under ATEN_CPU_CAPABILITY=default and 1.4e-6 under avx2, both with MKL_CBWR=COMPATIBLE
    # (0.0 without it); 1e-5 leaves a factor of 4.
    ours_negative = generator.unconditional_context.expand_as(negative)
    assert (negative - ours_negative).abs().max() <= 1e-5
    print(f"\nempty-prompt context vs the pipeline's: max diff {(negative - ours_negative).abs().max():.2e}")
    # Given that context, the rest is exact: same latents, same steps, same kernels on the same batches.
    reference = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=ours_negative,
        latents=generator.initial_latents(seeds),
        num_inference_steps=STANDARD.steps,
        guidance_scale=STANDARD.guidance_scale,
        output_type="latent",
    ).images  # [2, C, h, w]
    ours = generator.final_latents(emb, seeds)  # the defaults: 25 steps, guidance 3
    assert torch.equal(ours, reference)
    assert torch.equal(generator.render(emb, seeds), generator.decode(reference))


def test_unconditional_context_is_the_empty_prompt_computed_once(generator, identities):
    ids = generator.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, :2].tolist() == [generator.tokenizer.bos_token_id, generator.tokenizer.eos_token_id]
    expected = generator.text_encoder(input_ids=ids).last_hidden_state  # [1, L, H]
    cached = generator.unconditional_context
    assert torch.equal(cached, expected)
    # not the prompt with a zero identity: that conditions differently
    assert (generator.encode_identities(torch.zeros(1, 512)) - cached).abs().max() > 0.5
    generator.render(identities[:1], [5], steps=2)
    assert generator.unconditional_context is cached


@pytest.mark.parametrize(
    ("embeddings", "seeds", "steps", "argument"),
    [
        (torch.zeros(2, 256), [0, 1], 2, "embeddings"),
        (torch.zeros(512), [0], 2, "embeddings"),
        (torch.zeros(2, 512), [0], 2, "seeds"),
        (torch.zeros(1, 512), [0], 0, "steps"),
    ],
)
def test_render_rejects_bad_input(generator, embeddings, seeds, steps, argument):
    with pytest.raises(ValueError, match=argument):
        generator.render(embeddings, seeds, steps=steps)


# ---- the published layout ----------------------------------------------------------------------


def save_v4_encoder(encoder: CLIPTextModel, directory: Path, weights: str, position_ids: bool = False):
    """Save `encoder` as transformers 4 did for Arc2Face: `text_model.` keys, a v4 config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"text_model.{k}": v.clone() for k, v in encoder.state_dict().items()}
    if position_ids:  # transformers < 4.31 also saved this buffer
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # [1, L]
    if weights == "pytorch_model.bin":
        torch.save(state, directory / weights)
    else:
        save_file(state, directory / weights, metadata={"format": "pt"})
    c = encoder.config
    config = {
        "_name_or_path": "runwayml/stable-diffusion-v1-5",
        "architectures": ["CLIPTextModelWrapper"],
        "attention_dropout": 0.0,
        "bos_token_id": c.bos_token_id,
        "dropout": 0.0,
        "eos_token_id": c.eos_token_id,
        "hidden_act": "quick_gelu",
        "hidden_size": c.hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": c.max_position_embeddings,
        "model_type": "clip_text_model",
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "pad_token_id": c.pad_token_id,
        "projection_dim": c.projection_dim,
        "torch_dtype": "float32",
        "transformers_version": "4.36.2",
        "vocab_size": c.vocab_size,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


@pytest.mark.parametrize(
    ("weights", "position_ids"),
    [("pytorch_model.bin", True), ("pytorch_model.bin", False), ("model.safetensors", False)],
)
def test_transformers4_encoder_loads_into_transformers5(generator, tmp_path, weights, position_ids):
    original = generator.text_encoder
    save_v4_encoder(original, tmp_path, weights, position_ids)
    loaded = load_text_encoder(tmp_path)
    assert type(loaded) is CLIPTextModel and loaded.config.hidden_size == original.config.hidden_size
    assert loaded.state_dict().keys() == original.state_dict().keys()
    for k, v in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = generator.prompt_ids[None]  # [1, L]
    assert torch.equal(loaded(input_ids=ids).last_hidden_state, original(input_ids=ids).last_hidden_state)


def test_encoder_with_a_missing_weight_is_refused(generator, tmp_path):
    save_v4_encoder(generator.text_encoder, tmp_path, "model.safetensors")
    state = load_file(tmp_path / "model.safetensors")
    del state["text_model.final_layer_norm.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="final_layer_norm.bias"):
        load_text_encoder(tmp_path)


RAN = []  # set if unpickling ever runs the payload below


def _payload() -> None:
    RAN.append(True)


class CodeRunningPickle:
    def __reduce__(self):
        return (_payload, ())


def test_encoder_bin_that_runs_code_is_refused(generator, tmp_path):
    save_v4_encoder(generator.text_encoder, tmp_path, "pytorch_model.bin")
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "evil": CodeRunningPickle()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_text_encoder(tmp_path)
    assert not RAN


def published_layout(tiny_dir: Path, root: Path) -> tuple[Path, Path]:
    """The tiny preset rearranged as published: Arc2Face (v4 encoder .bin) and a separate SD 1.5 base."""
    arc2face, sd15 = root / "arc2face-model", root / "sd15"
    shutil.copytree(tiny_dir / UNET_DIR, arc2face / UNET_DIR)
    encoder = load_text_encoder(tiny_dir / ENCODER_DIR)
    save_v4_encoder(encoder, arc2face / ENCODER_DIR, "pytorch_model.bin")
    for sub in (VAE_DIR, TOKENIZER_DIR):
        shutil.copytree(tiny_dir / sub, sd15 / sub)
    (sd15 / SCHEDULER_DIR).mkdir(parents=True)
    (sd15 / SCHEDULER_DIR / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2))
    return arc2face, sd15


def test_published_layout_with_separate_base_renders_as_preset(generator, tiny_dir, tmp_path, identities):
    arc2face, sd15 = published_layout(tiny_dir, tmp_path)
    gen = Arc2FaceGenerator.from_pretrained(arc2face, base=sd15)
    cfg = gen.scheduler.config
    assert type(gen.scheduler) is DPMSolverMultistepScheduler
    assert (cfg.algorithm_type, cfg.solver_order, cfg.beta_schedule, cfg.steps_offset) == (
        "dpmsolver++", 2, "scaled_linear", 1,
    )  # fmt: skip
    # the published recipe: DPMSolverMultistepScheduler.from_config(<SD 1.5 PNDM scheduler>.config)
    reference = DPMSolverMultistepScheduler.from_config(
        PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG).config
    )
    for s in (gen.scheduler, reference):
        s.set_timesteps(STANDARD.steps)
    assert torch.equal(gen.scheduler.timesteps, reference.timesteps)
    assert torch.allclose(gen.scheduler.sigmas, reference.sigmas)
    assert (STANDARD.steps, STANDARD.guidance_scale) == (25, 3.0)
    images = gen.render(identities[:1], [5], steps=STEPS)
    assert torch.equal(images, generator.render(identities[:1], [5], steps=STEPS))


def test_missing_files_are_named_with_what_goes_there(tiny_dir, tmp_path):
    arc2face, sd15 = published_layout(tiny_dir, tmp_path)
    (arc2face / ENCODER_DIR / "pytorch_model.bin").unlink()
    shutil.rmtree(sd15 / SCHEDULER_DIR)
    with pytest.raises(FileNotFoundError) as info:
        Arc2FaceGenerator.from_pretrained(arc2face, base=sd15)
    message = str(info.value)
    assert str(arc2face / ENCODER_DIR / "pytorch_model.bin") in message and "text encoder weights" in message
    assert str(sd15 / SCHEDULER_DIR / "scheduler_config.json") in message and "noise schedule" in message
    assert "vae" not in message and "arc2face/config.json" not in message
    with pytest.raises(FileNotFoundError, match="base"):
        Arc2FaceGenerator.from_pretrained(arc2face, base=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="vae/config.json"):  # no base: SD 1.5 parts expected in path
        Arc2FaceGenerator.from_pretrained(arc2face)


def test_layout_requires_the_tokenizer_config(tiny_dir, tmp_path):
    arc2face, sd15 = published_layout(tiny_dir, tmp_path)
    (sd15 / TOKENIZER_DIR / "tokenizer_config.json").unlink()  # without it model_max_length is unbounded
    with pytest.raises(FileNotFoundError) as info:
        Arc2FaceGenerator.from_pretrained(arc2face, base=sd15)
    message = str(info.value)
    assert str(sd15 / TOKENIZER_DIR / "tokenizer_config.json") in message and "tokenizer config" in message
    assert "vocab.json" not in message and "merges.txt" not in message


def test_layout_asks_only_for_files_the_published_model_lists():
    # every file the loader requires (one of its alternatives) is one the zoo fetches and pins
    published = set(zoo.ARC2FACE_FILES)
    for sub, names, what in ARC2FACE_FILES + SD15_FILES:
        assert any(f"{sub}/{n}" in published for n in names), what
    assert (TOKENIZER_DIR, ("tokenizer_config.json",)) in [(sub, names) for sub, names, _ in SD15_FILES]


def break_weights(directory: Path, rename: str, drop: str, reshape: str) -> None:
    """Rewrite directory/diffusion_pytorch_model.safetensors: one key renamed, one dropped, one misshapen."""
    weights = directory / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state[rename + "_renamed"] = state.pop(rename)
    del state[drop]
    state[reshape] = torch.zeros(state[reshape].shape[0] + 1)
    save_file(state, weights)


@pytest.mark.parametrize(
    ("sub", "rename", "drop", "reshape"),
    [
        (UNET_DIR, "conv_in.weight", "down_blocks.0.attentions.0.proj_in.bias", "conv_out.bias"),
        (VAE_DIR, "decoder.conv_in.weight", "encoder.mid_block.attentions.0.to_q.bias", "quant_conv.bias"),
    ],
)
def test_unet_or_vae_whose_keys_do_not_match_is_refused(tiny_dir, tmp_path, sub, rename, drop, reshape):
    root = tmp_path / "model"
    shutil.copytree(tiny_dir, root)
    break_weights(root / sub, rename, drop, reshape)
    with pytest.raises(ValueError) as info:
        Arc2FaceGenerator.from_pretrained(root)
    message = str(info.value)
    assert str(root / sub / "diffusion_pytorch_model.safetensors") in message
    assert re.search(rf"missing keys \[[^]]*'{re.escape(drop)}'", message), message
    assert re.search(rf"missing keys \[[^]]*'{re.escape(rename)}'", message), message
    assert re.search(rf"unexpected keys \['{re.escape(rename)}_renamed'\]", message), message
    assert f"{reshape}: expected" in message, message


def test_vae_with_pre_0_14_attention_names_loads_exactly(tiny_dir, tmp_path):
    """SD 1.5's VAE checkpoint may carry the old attention names; diffusers renames them on load."""
    shutil.copytree(tiny_dir / VAE_DIR, tmp_path / VAE_DIR)
    weights = tmp_path / VAE_DIR / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in load_file(weights).items():
        for new_name, old_name in old.items():
            key = key.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        state[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in state
    save_file(state, weights)
    loaded = load_diffusers_model(AutoencoderKL, tmp_path / VAE_DIR)
    expected = load_diffusers_model(AutoencoderKL, tiny_dir / VAE_DIR)
    for (k, v), (k0, v0) in zip(loaded.state_dict().items(), expected.state_dict().items(), strict=True):
        assert k == k0 and torch.equal(v, v0), k


def test_bad_dtype_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="dtype"):
        Arc2FaceGenerator.from_pretrained(tiny_dir, dtype=torch.float64)


# ---- LCM-LoRA -----------------------------------------------------------------------------------

# Layers the LCM distillation script adapts (peft target_modules), matched on the module name's end.
LCM_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
RANK, ALPHA = 4, 8.0  # the script's peft LoraConfig: r from the command line, lora_alpha left at 8


def lcm_lora_factors(unet: torch.nn.Module, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random peft-shaped factors: lora_A is a conv with the layer's kernel (or a linear), lora_B 1x1."""
    g = make_generator(seed)
    factors = {}
    for name, m in unet.named_modules():
        if not name.endswith(LCM_TARGETS) or not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = m.weight
        down = g.normal(RANK, *w.shape[1:]) * 0.05  # [r, in(, kh, kw)]
        kernel = [1, 1] if w.ndim == 4 else []
        up = g.normal(w.shape[0], RANK, *kernel) * 0.05  # [out, r(, 1, 1)]
        factors[name] = (down.half(), up.half())
    return factors


def kohya_state(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float = ALPHA) -> dict:
    """The published file's layout: the script renames peft keys with every dot but the last two -> "_"."""
    state = {}
    for name, (down, up) in factors.items():
        for role, t in (("lora_A", down), ("lora_B", up)):
            key = f"base_model.model.{name}.{role}.weight".replace("base_model.model", "lora_unet")
            key = key.replace("lora_A", "lora_down").replace("lora_B", "lora_up")
            state[key.replace(".", "_", key.count(".") - 2)] = t
        state[f"lora_unet_{name.replace('.', '_')}.alpha"] = torch.tensor(alpha).half()
    return state


def place_pinned_lcm_lora(models: Path, model_dir: Path, pins: Path) -> None:
    """An LCM-LoRA file for the tiny Arc2Face already under `models/arc2face-tiny`, in the published
    layout, and a registry override file `pins` that pins its sha256."""
    from models.registry import file_sha256, load_generator

    lora = models / "arc2face-tiny" / "lcm-lora" / "pytorch_lora_weights.safetensors"
    lora.parent.mkdir()
    save_file(kohya_state(lcm_lora_factors(load_generator("arc2face-tiny", model_dir).unet)), lora)
    pins.write_text(json.dumps({"models": {"arc2face-tiny": {"sha256": {
        "lcm-lora/pytorch_lora_weights.safetensors": file_sha256(lora)}}}}))


@pytest.fixture(scope="module")
def lora_file(generator, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lcm-lora") / "pytorch_lora_weights.safetensors"
    save_file(kohya_state(lcm_lora_factors(generator.unet)), path)
    return path


def test_kohya_keys_look_like_the_published_file(lora_file):
    keys = load_file(lora_file).keys()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_down.weight" in keys


def test_fused_weights_match_an_independent_computation(generator, lora_file):
    unet = copy.deepcopy(generator.unet)
    fused = load_lcm_lora(lora_file, unet)
    factors = lcm_lora_factors(generator.unet)
    assert {f.module for f in fused} == set(factors)
    before, after = generator.unet.state_dict(), unet.state_dict()
    for key, w0 in before.items():
        name = key.removesuffix(".weight")
        if name not in factors:
            assert torch.equal(after[key], w0), key  # biases, norms, unadapted layers untouched
            continue
        down, up = (t.double() for t in factors[name])
        if w0.ndim == 4:
            delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        else:
            delta = torch.einsum("or,ri->oi", up, down)
        expected = (w0.double() + ALPHA / RANK * delta).float()
        assert torch.allclose(after[key], expected, atol=1e-6), key
    # a fused layer computes what the LoRA layer computes: base(x) + alpha / r * up(down(x))
    conv_name = "down_blocks.0.resnets.0.conv1"
    conv0, conv1 = generator.unet.get_submodule(conv_name), unet.get_submodule(conv_name)
    down, up = (t.float() for t in factors[conv_name])
    x = make_generator(1).normal(2, conv0.in_channels, 8, 8)
    lora_out = F.conv2d(F.conv2d(x, down, stride=conv0.stride, padding=conv0.padding), up)
    assert torch.allclose(conv1(x), conv0(x) + ALPHA / RANK * lora_out, atol=1e-5)
    lin_name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    lin0, lin1 = generator.unet.get_submodule(lin_name), unet.get_submodule(lin_name)
    down, up = (t.float() for t in factors[lin_name])
    y = make_generator(2).normal(3, lin0.in_features)
    assert torch.allclose(lin1(y), lin0(y) + ALPHA / RANK * (y @ down.T @ up.T), atol=1e-5)


def test_peft_layout_fuses_like_kohya(generator):
    factors = lcm_lora_factors(generator.unet, seed=3)
    peft = {}
    for name, (down, up) in factors.items():
        peft[f"unet.{name}.lora_A.weight"], peft[f"unet.{name}.lora_B.weight"] = down, up
    a, b = copy.deepcopy(generator.unet), copy.deepcopy(generator.unet)
    fuse_lora(a, parse_lora(peft, a))  # no alpha keys: alpha = rank
    fuse_lora(b, parse_lora(kohya_state(factors, alpha=RANK), b))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.parametrize(
    "bad_key",
    [
        "lora_unet_down_blocks_0_attentions_0_no_such_layer.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a",
    ],
)
def test_unknown_lora_key_is_rejected_by_name(generator, bad_key):
    state = kohya_state(lcm_lora_factors(generator.unet))
    state[bad_key] = torch.zeros(RANK, 4)
    with pytest.raises(ValueError, match=re.escape(bad_key)):
        parse_lora(state, generator.unet)


def test_lora_factor_without_partner_or_with_wrong_shape_is_rejected(generator):
    state = kohya_state(lcm_lora_factors(generator.unet))
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    broken = {k: v for k, v in state.items() if k != f"{name}.lora_up.weight"}
    with pytest.raises(ValueError, match="down_blocks.0.resnets.0.conv1"):
        parse_lora(broken, generator.unet)
    state[f"{name}.lora_down.weight"] = torch.zeros(RANK, 7, 3, 3)
    with pytest.raises(ValueError, match="down factor"):
        parse_lora(state, generator.unet)


@pytest.fixture(scope="module")
def fast_generator(tiny_dir, lora_file) -> Arc2FaceGenerator:
    return Arc2FaceGenerator.from_pretrained(tiny_dir, lcm_lora=lora_file)


def test_fast_mode_renders_with_lcm(fast_generator, generator, identities):
    assert type(fast_generator.fast_scheduler) is LCMScheduler
    assert (FAST.steps, FAST.guidance_scale) == (4, 1.0)
    fast = fast_generator.render(identities[:2], [5, 6], fast=True)
    assert fast.shape == (2, 32, 32, 3) and fast.dtype == torch.uint8 and fast.float().std() > 5
    assert torch.equal(fast, fast_generator.render(identities[:2], [5, 6], fast=True))
    standard = fast_generator.render(identities[:2], [5, 6], steps=STEPS)
    assert torch.equal(standard, generator.render(identities[:2], [5, 6], steps=STEPS))  # UNet untouched
    assert changed_fraction(fast, standard) > 0.25
    # LCM re-noises between steps from each image's own generator: independent of batch neighbours
    singles = [fast_generator.render(identities[i : i + 1], [s], fast=True) for i, s in ((0, 5), (1, 6))]
    singles = torch.cat(singles)
    assert (singles.int() - fast.int()).abs().max() <= 2
    assert torch.equal(fast[:1], fast_generator.render(identities[:2], [5, 7], fast=True)[:1])


def test_fast_mode_draws_only_from_the_seeds_streams(fast_generator, identities):
    """Same seeds, same bits, whatever torch's global RNG holds; and that RNG is never advanced."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        before = torch.random.get_rng_state()
        first = fast_generator.final_latents(identities[:2], [5, 6], fast=True)
        assert torch.equal(torch.random.get_rng_state(), before)  # no draw from the global RNG
        torch.manual_seed(2)
        second = fast_generator.final_latents(identities[:2], [5, 6], fast=True)
    assert torch.equal(first, second)
    assert torch.equal(
        fast_generator.render(identities[:2], [5, 6], fast=True),
        fast_generator.render(identities[:2], [5, 6], fast=True),
    )


def test_lcm_steps_are_the_schedulers_with_noise_from_each_stream(fast_generator, identities):
    """Rebuild fast mode by hand: diffusers' LCMScheduler.step gives the clean estimate and, with the
    noise it drew, the next sample; ours must give the same, and render's re-noise must be
    sqrt(abar_next) * denoised + sqrt(1 - abar_next) * noise with noise read from image b's stream
    right after its initial latent, step after step."""
    gen, emb, seeds = fast_generator, identities[:2], [5, 6]
    c, s = gen.unet.config.in_channels, gen.unet.config.sample_size
    streams = [make_generator(seed) for seed in seeds]
    latents = torch.stack([g.normal(c, s, s) for g in streams])  # [2, C, h, w]
    context = gen.encode_identities(emb)  # [2, L, H]
    scheduler = LCMScheduler.from_config(gen.fast_scheduler.config)
    scheduler.set_timesteps(FAST.steps)
    timesteps = scheduler.timesteps
    renoised = 0
    for i, t in enumerate(timesteps):
        with torch.no_grad():
            eps = gen.fast_unet(latents, t, encoder_hidden_states=context).sample
        torch_noise = torch.Generator().manual_seed(i)
        step = scheduler.step(eps, t, latents, generator=torch_noise)
        denoised = lcm_denoise(scheduler, eps, t, latents)
        assert torch.equal(denoised, step.denoised), i
        if i == len(timesteps) - 1:
            assert torch.equal(
                step.prev_sample, step.denoised
            )  # the last step's output is the clean estimate
            latents = denoised
            break
        t_next = timesteps[i + 1]
        drawn = randn_tensor(eps.shape, generator=torch.Generator().manual_seed(i))  # the step's own draw
        assert torch.equal(lcm_renoise(scheduler, denoised, drawn, t_next), step.prev_sample), i
        noise = torch.stack([g.normal(c, s, s) for g in streams])  # [2, C, h, w]
        abar = scheduler.alphas_cumprod[t_next]
        latents = abar.sqrt() * denoised + (1 - abar).sqrt() * noise
        renoised += 1
    assert renoised == FAST.steps - 1
    assert torch.equal(gen.final_latents(emb, seeds, fast=True), latents)
    assert torch.equal(gen.render(emb, seeds, fast=True), gen.decode(latents))


def test_generator_refuses_schedulers_that_draw_noise(generator):
    parts = (generator.unet, generator.vae, generator.text_encoder, generator.tokenizer)
    sde = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="sde-dpmsolver"):
        Arc2FaceGenerator(*parts, sde)
    with pytest.raises(ValueError, match="LCMScheduler"):
        Arc2FaceGenerator(
            *parts, generator.scheduler, fast_unet=generator.unet, fast_scheduler=generator.scheduler
        )


def test_fast_scheduler_follows_the_published_recipe():
    # Arc2Face's README: LCMScheduler.from_config(pipeline.scheduler.config) on the DPM-Solver++
    # scheduler made from SD 1.5's PNDM config
    dpm = DPMSolverMultistepScheduler.from_config(PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG).config)
    reference, ours = LCMScheduler.from_config(dpm.config), lcm_scheduler(SD15_SCHEDULER_CONFIG)
    for s in (reference, ours):
        s.set_timesteps(FAST.steps)
    assert torch.equal(ours.timesteps, reference.timesteps)
    assert ours.timesteps.tolist() == [999, 759, 499, 259]
    assert torch.equal(ours.alphas_cumprod, reference.alphas_cumprod)
    assert ours.final_alpha_cumprod == reference.final_alpha_cumprod


def test_fast_mode_without_lora_is_refused(generator, identities):
    assert not generator.has_fast_mode
    with pytest.raises(ValueError, match="fast"):
        generator.render(identities[:1], [0], fast=True)


# ---- batching and device settings ---------------------------------------------------------------


def test_max_batch_gives_the_unchunked_images(generator, identities):
    emb = torch.cat([identities, identities[:1]])  # [5, 512]
    seeds = [31, 32, 33, 34, 35]
    whole = generator.render(emb, seeds, steps=STEPS)
    assert torch.equal(generator.render(emb, seeds, steps=STEPS, max_batch=8), whole)
    for max_batch in (2, 3):
        chunked = generator.render(emb, seeds, steps=STEPS, max_batch=max_batch)
        # each chunk is exactly a render of its own: seeds and embeddings stay paired, in order
        n = max_batch
        parts = [generator.render(emb[i : i + n], seeds[i : i + n], steps=STEPS) for i in (0, n)]  # 2 chunks
        assert torch.equal(chunked[: 2 * n], torch.cat(parts)), max_batch
        # and the images of the one big call: kernels may sum in another order for another batch
        # size (here the VAE's convolutions), so equal up to a rare 1-level rounding difference
        assert (chunked.int() - whole.int()).abs().max() <= 1, max_batch
        assert (chunked != whole).float().mean() < 1e-3, max_batch


@pytest.mark.parametrize("max_batch", [0, -1, True, 2.0])
def test_bad_max_batch_is_refused(generator, identities, max_batch):
    with pytest.raises(ValueError, match="max_batch"):
        generator.render(identities[:2], [0, 1], steps=STEPS, max_batch=max_batch)


def test_half_precision_and_channels_last_render_alike(generator, tiny_dir, identities):
    reference = generator.render(identities[:1], [5], steps=STEPS).float()
    for dtype in (torch.bfloat16, torch.float16):
        half = Arc2FaceGenerator.from_pretrained(tiny_dir, dtype=dtype)
        assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == dtype
        images = half.render(identities[:1], [5], steps=STEPS).float()
        assert (images - reference).abs().mean() < 2.0, dtype
    nhwc = Arc2FaceGenerator.from_pretrained(tiny_dir, channels_last=True)
    assert nhwc.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (nhwc.render(identities[:1], [5], steps=STEPS).float() - reference).abs().max() <= 2


def test_compiled_unet_renders_the_same(tiny_dir, generator, identities):
    gen = Arc2FaceGenerator.from_pretrained(tiny_dir)
    gen.compile_unet(backend="eager")  # inductor needs a GPU run to be worth it; eager checks the wiring
    assert gen._denoisers[False] is not gen.unet
    images = gen.render(identities[:1], [5], steps=STEPS)
    assert torch.equal(images, generator.render(identities[:1], [5], steps=STEPS))
