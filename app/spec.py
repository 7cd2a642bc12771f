"""The job spec: the public contract of POST /v1/jobs, shared with the workers.

The pydantic models are the source of truth; their JSON Schema is the documentation. Checks that
need the service's limits (identities, images) happen in `check_limits`, against the settings.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app import catalog


class _Strict(BaseModel):
    # No infinities or NaN (JSON has neither; Python's parser reads 1e400 as inf): a spec is stored and
    # sent back as strict JSON, and no parameter means anything at infinity.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# A job id (`new_job_id`: "j", 14 hex digits of microseconds, 8 random) and a reference-set name (a
# file name in the workers' model directory): the two kinds of entry of `sampler.exclude`.
JOB_ID_PATTERN = r"^j[0-9a-f]{22}$"
REFERENCE_SET_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Exclusion(_Strict):
    """What every sampler takes: identities to stay away from."""

    exclude: list[Annotated[str, Field(pattern=f"{JOB_ID_PATTERN}|{REFERENCE_SET_PATTERN}")]] = Field(
        default_factory=list, max_length=64,
        description="identities to keep away from: ids of the team's succeeded jobs (same generator and "
        "embedder: their identities) and names of reference sets the workers hold "
        "(reference_sets/{name}.safetensors, e.g. a gallery of real people). Every new identity ends at "
        "least exclude_min_angle_deg from each of them, or the job fails saying how close it got")
    exclude_min_angle_deg: float = Field(
        60.0, gt=0, lt=180,
        description="the least angle, degrees, between a new identity and any excluded one (in the "
        "identities' embedding space)")

    @field_validator("exclude")
    @classmethod
    def _no_repeats(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"exclude lists an entry twice: {sorted(x for x in set(v) if v.count(x) > 1)}")
        return v


class RandomSampler(_Exclusion):
    """Uniform points on the embedding hypersphere: the baseline every quality figure compares to."""

    method: Literal["random"] = "random"


class HyperFaceSampler(_Exclusion):
    """HyperFace packing on the hypersphere (Otroshi Shahreza & Marcel, ICLR 2025)."""

    method: Literal["hyperface"]
    iterations: int = Field(2000, ge=1, le=100_000, description="optimisation steps")
    learning_rate: float = Field(0.01, gt=0, le=1, description="Adam step size")
    alpha: float = Field(0.5, ge=0, description="gallery regulariser weight; 0 = pure packing")
    gallery_size: int = Field(
        10_000, ge=1, le=1_000_000,
        description="images rendered by the gallery generator and embedded by the job embedder: "
        "the manifold of real-looking face embeddings that points start from and stay near")
    batch_size: int | None = Field(
        None, ge=2, description="None = full batch; else the stochastic variant's rows per step")
    gallery_refresh: int = Field(
        10, ge=1, description="steps between recomputing each point's nearest gallery point")
    restarts: int | None = Field(
        None, ge=1, le=64,
        description="pure packing (alpha = 0) only: rounds of candidates annealed in parallel, each "
        "round from perturbations of the best so far, stopping early at Rankin's bound or when a round "
        "gains nothing: the packer's default configuration (docs/packing.md), which reaches >= 0.99 of "
        "the best known codes. It runs its own schedule, so iterations, learning_rate and batch_size "
        "stay at their defaults. A new spec with alpha = 0 that leaves those at their defaults gets 8; "
        "null = one run of the paper's schedule")

    @model_validator(mode="after")
    def _restarts_pack(self) -> HyperFaceSampler:
        if self.restarts is None:
            return self
        if self.alpha != 0:
            raise ValueError("restarts: the restart packer runs pure packing; set alpha to 0 or restarts to null")
        changed = [f for f in ("iterations", "learning_rate", "batch_size")
                   if getattr(self, f) != type(self).model_fields[f].default]
        if changed:
            raise ValueError(f"restarts: the restart packer runs its own schedule (docs/packing.md), so "
                             f"{' and '.join(changed)} cannot be set with it; set restarts to null to run one "
                             "optimiser run with them")
        return self


def _time_step_not_zero(v: float, info: ValidationInfo) -> float:
    """A time-step setting: > 0 is a fixed step, < 0 an adaptive one; 0 is neither."""
    if v == 0:
        raise ValueError(f"{info.field_name} must be < 0 (adaptive time step) or > 0 (fixed), not 0")
    return v


class LangevinSampler(_Exclusion):
    """Langevin repulsion of StyleGAN2 latents in embedding space (Geissbuhler et al., ICML 2025)."""

    method: Literal["langevin"]
    iterations: int = Field(100, ge=1, le=10_000, description="Langevin steps")
    repulsion_radius: float = Field(1.4, gt=0, le=3.1416, description="r0, radians: identities "
                                    "closer than this angle in embedding space repel")
    stiffness: float = Field(1.0, gt=0, description="k of the soft-sphere potential (k/2)(r0 - theta)^2")
    latent_pull: float = Field(0.1, ge=0, description="k_l, pull toward the average latent")
    noise: float = Field(0.01, ge=0, description="eta, Langevin noise scale")
    tau: float = Field(-0.3, description="< 0: adaptive time step with |tau|; > 0: fixed dt = tau; "
                       "0 is refused")
    truncation: float = Field(0.7, ge=0, le=1, description="psi of the initial latents: "
                              "w_avg + psi (mapping(z) - w_avg)")
    batch_size: int = Field(64, ge=1, le=4096, description="identities per forward/backward pass "
                            "(memory only: results do not depend on it)")

    _tau_not_zero = field_validator("tau")(_time_step_not_zero)


def _method_or(default: str) -> Any:
    """Discriminate on `method`, which may be left out: then it is `default`."""
    def pick(v: Any) -> Any:
        return v.get("method", default) if isinstance(v, dict) else getattr(v, "method", None)
    return Discriminator(pick)


Sampler = Annotated[
    Annotated[RandomSampler, Tag("random")] | Annotated[HyperFaceSampler, Tag("hyperface")] | Annotated[LangevinSampler, Tag("langevin")],
    _method_or("random"),
]


class EmbeddingNoise(_Strict):
    """Samples are normalise(reference + scale * xi): for embedding-conditioned generators."""

    method: Literal["embedding_noise"] = "embedding_noise"
    scale: float = Field(
        0.05, ge=0, le=10,
        description="sigma per coordinate of the Gaussian added before re-normalising; in 512-d "
        "the mean cosine to the reference is about 1/sqrt(1 + 512 sigma^2) (0.05 -> 0.66)")
    target_cosine: float | None = Field(
        None, gt=0, le=1,
        description="instead of scale: the mean cosine of samples to their reference; the "
        "worker solves for the scale and reports the realised cosines")
    cone_degrees: float | None = Field(
        None, gt=0, le=90,
        description="instead of scale: samples drawn uniformly (in solid angle) from the cone of this "
        "half-angle around the reference, so every one is within it (in 512-d most lie near its "
        "rim); the report states the realised angles")

    @model_validator(mode="after")
    def _one_spread(self) -> EmbeddingNoise:
        # A normalised spec (stored, in a manifest) lists `scale` at its default beside the spread it
        # used: that is not a second spread. A scale other than the default is.
        given = [f for f in ("target_cosine", "cone_degrees") if getattr(self, f) is not None]
        if "scale" in self.model_fields_set and self.scale != type(self).model_fields["scale"].default:
            given.insert(0, "scale")
        if len(given) > 1:
            raise ValueError(f"give one of scale, target_cosine and cone_degrees, not {' and '.join(given)}")
        return self


class Dispersion(_Strict):
    """Dispersion of each identity's variations around its reference latent (latent generators):
    attraction to the reference embedding, repulsion among the identity's latents, pull to w_avg."""

    method: Literal["dispersion"]
    iterations: int = Field(20, ge=0, le=1000, description="dispersion steps (0 = the initial latents)")
    init_scale: float = Field(0.2, ge=0, description="sigma of the Gaussian offsets of the initial latents")
    attraction: float = Field(20.0, ge=0, description="k_e of (k_e/4) theta(e, e_ref)^2")
    repulsion: float = Field(1.0, ge=0, description="k_w of the latent soft-sphere repulsion")
    repulsion_radius: float = Field(12.0, gt=0, description="radius of the latent repulsion, W units")
    latent_pull: float = Field(1.0, ge=0, description="k_g, pull toward the average latent")
    noise: float = Field(0.05, ge=0, description="Langevin noise scale")
    dt: float = Field(0.05, description="time step: > 0 fixed; < 0 adaptive, |dt| x (smallest distance "
                      "between the identity's variations) / (largest force); 0 is refused")
    batch_size: int = Field(64, ge=1, le=4096, description="latents per forward/backward pass "
                            "(memory only: results do not depend on it)")

    _dt_not_zero = field_validator("dt")(_time_step_not_zero)


class DisCo(Dispersion):
    """Dispersion whose initial latents add a random mix of covariate directions (pose,
    illumination, expression) fitted for the generator (its `covariates.safetensors`)."""

    method: Literal["disco"]  # type: ignore[assignment]


Variations = Annotated[
    Annotated[EmbeddingNoise, Tag("embedding_noise")] | Annotated[Dispersion, Tag("dispersion")] | Annotated[DisCo, Tag("disco")],
    _method_or("embedding_noise"),
]


class ModelsSpec(_Strict):
    embedder: str = Field("iresnet-tiny", description="face-recognition model (catalogue name)")
    generator: str = Field("arc2face-tiny", description="image generator (catalogue name)")
    gallery_generator: str | None = Field(
        None, description="generator of the HyperFace gallery (hyperface only): an embedding-"
        "conditioned one (Arc2Face) renders random conditioning embeddings, a latent one (StyleGAN2, "
        "as in the HyperFace paper) random latents; either way the job's embedder embeds the aligned "
        "images. None = the job's generator"
    )


FAST_DEFAULTS = {"steps": 4, "guidance_scale": 1.0}  # LCM-LoRA's recommended few-step sampling


class RenderSpec(_Strict):
    mode: Literal["standard", "fast"] = Field(
        "standard", description="standard: DPM-Solver++ (25 steps, guidance 3.0 by default); fast: "
        "LCM-LoRA with the LCM scheduler (4 steps, guidance 1.0 by default), for Arc2Face generators "
        "whose LCM-LoRA weights are installed")
    steps: int = Field(25, ge=1, le=200, description="diffusion steps")
    guidance_scale: float = Field(3.0, ge=0, le=30, description="classifier-free guidance (1 = none)")
    batch_size: int = Field(16, ge=1, le=512, description="images per generator call")

    @model_validator(mode="before")
    @classmethod
    def _fast_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") == "fast":
            return {**FAST_DEFAULTS, **data}
        return data


DatasetFormat = Literal["imagefolder", "webdataset", "recordio"]
MAX_LABEL = (1 << 24) - 1  # RecordIO stores labels as float32: exact up to 2**24


class OutputSpec(_Strict):
    formats: list[DatasetFormat] = Field(
        default=["imagefolder", "webdataset"], min_length=1,
        description="dataset layouts, at least one: imagefolder (loose files, dataset/imagefolder/"
        "{identity:06d}/{sample:03d}.jpg), webdataset (a tar per shard: .jpg + .cls + .json per sample), "
        "recordio (insightface's train.rec/.idx/.lst/property). Without imagefolder no image is a loose "
        "object: the Parquet index names each image's tar member or RecordIO record")
    image_size: Literal[112] = Field(112, description="aligned crop size, pixels (ArcFace template)")
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(95, ge=50, le=100)
    label_offset: int = Field(
        0, ge=0, le=MAX_LABEL,
        description="the class label of identity 0: identity i is labelled label_offset + i in every "
        "format (ImageFolder directory, WebDataset key and .cls, RecordIO label, the index's `label`), so "
        "datasets can be joined without relabelling; seeds still derive from (seed, identity, sample). "
        "An `extends` job gets its parent's offset + the parent's identities")

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"formats lists a layout twice: {v}")
        return v


class LeakageSpec(_Strict):
    """Compare every identity with a set of real people's embeddings the operator installed."""

    reference: str = Field(
        ..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="name of a reference set: the workers read reference_sets/{name}.safetensors (tensor "
        "'embeddings' [M, E], unit rows in the job embedder's space) from their model directory")
    threshold: float = Field(0.4, ge=-1, le=1, description="cosine between an identity's centre and a "
                             "reference embedding at or above which the identity counts as leaked")


class QualitySpec(_Strict):
    report: bool = Field(True, description="evaluate the dataset (stage `evaluating`) and write report/")
    min_identity_similarity: float | None = Field(
        None, ge=-1, le=1,
        description="filter: an image whose cosine to its identity's centre (job embedder, centre of "
        "the identity's first images) is below this is dropped and replaced by a new sample, so every "
        "identity still has images_per_identity images")
    max_topup_rounds: int = Field(
        3, ge=1, le=10, description="rounds of replacement samples (each renders images_per_identity "
        "candidates for every identity short of images) before the job fails with a reason")
    leakage: LeakageSpec | None = Field(None, description="optional leakage check against real faces")
    evaluator_sample: Literal["all"] | Annotated[int, Field(ge=2)] = Field(
        500, description="images the independent evaluator (SFace) embeds for the report: about this many, "
        "as whole identities (ceil(n / images_per_identity) of them, at least 2) drawn from the job seed; "
        "\"all\" embeds every image. The report states the sample and the confidence it gives "
        "(docs/outputs.md, \"Evaluator sample\")")

    @field_validator("leakage")
    @classmethod
    def _leakage_needs_report(cls, v: LeakageSpec | None, info: ValidationInfo) -> LeakageSpec | None:
        if v is not None and info.data.get("report") is False:
            raise ValueError("the leakage check is part of the quality report: set quality.report to true")
        return v


class WebhookSpec(_Strict):
    url: AnyHttpUrl
    events: list[Literal["completed", "failed", "canceled", "stage"]] = Field(
        default=["completed"], min_length=1
    )


MAX_PREVIEW_IDENTITIES = 1000  # a preview is a look before paying: a few shards at most


class PreviewSpec(_Strict):
    identities: int = Field(
        ..., ge=1, le=MAX_PREVIEW_IDENTITIES,
        description="the first K identities of the job to render (at most the job's identities)")


class FromPreview(_Strict):
    """The preview a full job continues: its id, and how many identities it rendered (the full job's
    first shards are the preview's, so its shard plan breaks at that count)."""

    job: str = Field(..., pattern=JOB_ID_PATTERN)
    identities: int = Field(..., ge=1, le=MAX_PREVIEW_IDENTITIES)


def plan_shards(identities: int, shard_identities: int) -> list[range]:
    """Identity ranges of at most `shard_identities`, covering [0, identities) with no gap."""
    if identities < 1 or shard_identities < 1:
        raise ValueError(f"identities={identities} and shard_identities={shard_identities} must be >= 1")
    n = -(-identities // shard_identities)
    return [range(k * shard_identities, min(identities, (k + 1) * shard_identities)) for k in range(n)]


class JobSpec(_Strict):
    identities: int = Field(..., ge=1, description="number of synthetic identities")
    images_per_identity: int = Field(..., ge=1, description="images rendered per identity")
    seed: int = Field(0, ge=0, lt=2**63, description="job seed: every image derives from it")
    sampler: Sampler = Field(default_factory=RandomSampler)
    variations: Variations = Field(default_factory=EmbeddingNoise)
    models: ModelsSpec = Field(default_factory=ModelsSpec)
    render: RenderSpec = Field(default_factory=RenderSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    quality: QualitySpec = Field(default_factory=QualitySpec)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=32)
    webhook: WebhookSpec | None = None
    extends: str | None = Field(
        None, pattern=JOB_ID_PATTERN,
        description="grow an existing dataset: the id of one of the team's succeeded jobs. Its spec gives "
        "this job's defaults (all but metadata, webhook and seed: a field given here wins); its "
        "identities and those it excluded are excluded (sampler.exclude), and labels continue after its "
        "own (output.label_offset). The seed, when not given, is derived from the parent's id and seed. "
        "docs/composition.md")
    preview: PreviewSpec | None = Field(
        None,
        description="a look before the full job: every identity is sampled (as the full job would), "
        "but only the first `identities` are rendered, with the full job's seeds, plus a contact sheet "
        "(preview/contact_sheet.png). Post the full job with from_preview set to this job's id: it keeps "
        "the sampled identities and the rendered shards, and its first images are these, byte for byte. "
        "docs/composition.md")
    from_preview: str | FromPreview | None = Field(
        None,
        description="the id of one of the team's succeeded previews (`preview`) whose dataset this job "
        "completes: its spec gives the defaults (like extends), and any field that would change the "
        "data must equal the preview's. The API stores it as {job, identities}")
    # Not part of the normalised spec or its hash: it orders work, it changes no byte of the data.
    priority: Literal["interactive", "batch"] | None = Field(
        None, exclude=True,
        description="interactive (CI and people: runs first within the team's share) or batch "
        "(backfills); null = the team's default. Over the team's interactive cap the job runs as "
        "batch and says so (docs/scheduling.md)")
    # Neither is part of the normalised spec or its hash either: they decide what happens to the data,
    # not what it is.
    retention_days: float | None = Field(
        None, gt=0, le=36500, exclude=True,
        description="days the dataset is kept after the job ends, then deleted with everything the "
        "job stored (the record stays, with `deleted_at`); null = the team's default "
        "(IDFORGE_RETENTION_DAYS / IDFORGE_TEAM_RETENTION_DAYS; none = kept until deleted). "
        "Fractions are allowed (0.5 = 12 hours)")
    reuse: Literal["never", "if_identical"] = Field(
        "never", exclude=True,
        description="if_identical: when the team has a succeeded job with the same dataset (the "
        "normalised spec without `metadata` and `webhook`, the same seed and model pins) whose data "
        "is still there, answer with that job (200, `reused`) instead of rendering again: it costs "
        "no quota and no GPU time. never: always render (the default)")

    @model_validator(mode="before")
    @classmethod
    def _latent_default_variations(cls, data: Any) -> Any:
        """A latent generator's variations default to dispersion, an embedding one's to noise."""
        if not isinstance(data, dict):
            return data
        generator = (data.get("models") or {}).get("generator") if isinstance(data.get("models"), dict) else None
        entry = catalog.CATALOG.get(generator) if isinstance(generator, str) else None
        if entry is None or entry.conditioning != "latent":
            return data
        variations = data.get("variations")
        if variations is None:
            return {**data, "variations": {"method": "dispersion"}}
        if isinstance(variations, dict) and "method" not in variations:
            return {**data, "variations": {**variations, "method": "dispersion"}}
        return data

    @field_validator("preview")
    @classmethod
    def _preview_fits(cls, v: PreviewSpec | None, info: ValidationInfo) -> PreviewSpec | None:
        n = info.data.get("identities")
        if v is not None and isinstance(n, int) and v.identities > n:
            raise ValueError(f"identities {v.identities} is more than the job's {n}")
        return v

    @field_validator("from_preview")
    @classmethod
    def _continues_preview(cls, v: str | FromPreview | None, info: ValidationInfo) -> str | FromPreview | None:
        if v is None:
            return v
        if info.data.get("preview") is not None:
            raise ValueError("a job is a preview (preview) or continues one (from_preview), not both")
        if isinstance(v, str):
            raise ValueError("a preview's id is resolved by the service (POST /v1/jobs), which stores "
                             "{job, identities}")
        n = info.data.get("identities")
        if isinstance(n, int) and v.identities > n:
            raise ValueError(f"the preview rendered {v.identities} identities, more than the job's {n}")
        return v

    @property
    def rendered_identities(self) -> int:
        """The identities in the dataset: a preview's first K, else all of them (every job samples all)."""
        return self.preview.identities if self.preview is not None else self.identities

    @property
    def continued_preview(self) -> FromPreview | None:
        """The preview this job continues (`from_preview` as the API stores it), or None."""
        return self.from_preview if isinstance(self.from_preview, FromPreview) else None

    @property
    def reused_identities(self) -> int:
        """The first identities whose shards a job takes from its preview (0 without one)."""
        p = self.continued_preview
        return p.identities if p is not None else 0

    @property
    def images_to_render(self) -> int:
        """The images this job renders itself (what its quota counts): its dataset's, less those it
        takes from its preview."""
        return (self.rendered_identities - self.reused_identities) * self.images_per_identity

    def shard_plan(self, shard_identities: int) -> list[range]:
        """The identity range of each shard: `shard_identities` at a time over the rendered
        identities, breaking at a preview's count in a job that continues it, so that its first
        shards are the preview's (a latent generator disperses a shard's identities together, so
        the ranges are part of what makes the bytes)."""
        k = self.reused_identities
        head = plan_shards(k, shard_identities) if k else []
        rest = self.rendered_identities - k
        return head + ([range(k + r.start, k + r.stop) for r in plan_shards(rest, shard_identities)]
                       if rest else [])

    def normalized(self) -> dict[str, Any]:
        """The spec with every default filled in, as JSON-ready data; but fields added after jobs
        existed are left out while unused (`LATER_FIELDS`), so an earlier spec normalises, and
        hashes, as it did when its job ran (its manifest's spec_hash still checks)."""
        out = self.model_dump(mode="json")
        for (part, name), unused in LATER_FIELDS.items():
            block = out.get(part)
            if isinstance(block, dict) and name in block and block[name] == unused:
                del block[name]
        for name in ("extends", "preview", "from_preview"):  # later fields, left out while unused
            if out.get(name) is None:
                out.pop(name, None)
        sampler = out.get("sampler")
        if isinstance(sampler, dict) and "exclude" not in sampler:
            sampler.pop("exclude_min_angle_deg", None)  # means nothing without an exclusion
        return out

    def spec_hash(self) -> str:
        return spec_hash(self.normalized())

    def dataset_hash(self) -> str:
        """What reuse compares: the normalised spec without the fields that change no byte of the
        dataset's images, labels or index (`metadata` describes the request, `webhook` whom to tell)."""
        return spec_hash({k: v for k, v in self.normalized().items() if k not in NOT_DATA})


# Fields added to the spec after jobs were made, and their unused value: `JobSpec.normalized` leaves
# them out at that value, so every earlier spec keeps its normalised form and hash.
LATER_FIELDS: dict[tuple[str, str], Any] = {
    ("variations", "cone_degrees"): None,
    ("sampler", "exclude"): [],
    ("sampler", "restarts"): None,
    ("output", "label_offset"): 0,
}

# What a spec submitted today gets where an earlier one meant something else by leaving a field out
# (`current_defaults`): pure HyperFace packing runs the restart packer, 8 rounds at most.
PACKER_RESTARTS = 8


def current_defaults(spec: JobSpec) -> JobSpec:
    """A newly submitted spec with today's defaults written in where a field's absence keeps an
    earlier job's meaning (so earlier specs still normalise, hash and reproduce as they did): pure
    HyperFace packing (alpha = 0) that sets none of the single run's schedule gets the restart packer.
    Only the API calls this, on submission; stored specs are never rewritten."""
    s = spec.sampler
    if not isinstance(s, HyperFaceSampler) or s.alpha != 0 or s.restarts is not None or \
            s.model_fields_set & {"iterations", "learning_rate", "batch_size"}:
        return spec
    return spec.model_copy(update={"sampler": s.model_copy(update={"restarts": PACKER_RESTARTS})})

# Fields of the normalised spec that change no byte of the dataset (see `JobSpec.dataset_hash`).
NOT_DATA = frozenset({"metadata", "webhook"})


def spec_hash(normalized: dict[str, Any]) -> str:
    blob = json.dumps(normalized, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


class SpecError(ValueError):
    """A spec that is well-formed but cannot run; `field` is the dotted path it names."""

    def __init__(self, field: str, message: str, code: str = "invalid_spec") -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code


def _pairs() -> str:
    parts = []
    for cond in ("embedding", "latent"):
        gens = catalog.generators(cond) or ["(none installed)"]
        samplers = sorted(m for m, c in catalog.SAMPLER_CONDITIONING.items() if cond in c)
        variations = sorted(m for m, c in catalog.VARIATION_CONDITIONING.items() if cond in c)
        parts.append(
            f"{cond}-conditioned generators {gens} take samplers {samplers} "
            f"and variations {variations}"
        )
    return "; ".join(parts)


def check_available(spec: JobSpec, statuses: dict[str, dict[str, Any]]) -> None:
    """Fail fast: a model the workers last reported unavailable (missing or unpinned weights, a bad
    checksum) is refused with their reason, which names the files and where they go. A model no
    worker has checked yet is let through; the worker fails the job with the same reason."""
    m = spec.models
    for field, name in (("models.generator", m.generator), ("models.embedder", m.embedder),
                        ("models.gallery_generator", m.gallery_generator)):
        status = statuses.get(name) if name else None
        if status is not None and not status.get("ok"):
            raise SpecError(field, f"model {name!r} is unavailable on the workers: {status.get('reason')}",
                            code="model_unavailable")


def check_models(spec: JobSpec) -> None:
    """Model names exist and have the right kind; methods can drive the chosen generator."""
    m = spec.models
    for field, name, kind in (
        ("models.embedder", m.embedder, "embedder"),
        ("models.generator", m.generator, "generator"),
        ("models.gallery_generator", m.gallery_generator, "generator"),
    ):
        if name is None:
            continue
        entry = catalog.CATALOG.get(name)
        if entry is None or entry.kind != kind:
            valid = catalog.embedders() if kind == "embedder" else catalog.generators()
            raise SpecError(
                field, f"unknown {kind} {name!r}; available: {valid}", code="unknown_model"
            )
    gen, emb = catalog.CATALOG[m.generator], catalog.CATALOG[m.embedder]
    if spec.sampler.method == "hyperface" and gen.embedding_dim != emb.embedding_dim:
        raise SpecError("models.embedder", f"hyperface places identities in the embedder's space "
                        f"({emb.embedding_dim}-d) and conditions {m.generator!r} on them "
                        f"({gen.embedding_dim}-d): the dimensions must match",
                        code="incompatible_models")
    cond = gen.conditioning
    if cond == "latent" and emb.family == "onnx":
        raise SpecError("models.embedder", f"latent-space sampling differentiates through the embedder; "
                        f"{m.embedder!r} is a forward-only ONNX model: choose an iresnet embedder",
                        code="incompatible_models")
    if spec.render.mode == "fast" and gen.family != "arc2face":
        raise SpecError("render.mode", f"fast mode is Arc2Face's LCM-LoRA sampling; {m.generator!r} is a "
                        f"{gen.family} generator", code="incompatible_models")
    sm, vm = spec.sampler.method, spec.variations.method
    if cond not in catalog.SAMPLER_CONDITIONING[sm]:
        raise SpecError(
            "sampler.method",
            f"sampler {sm!r} cannot drive {cond}-conditioned generator {m.generator!r}. "
            f"Valid pairs: {_pairs()}",
            code="incompatible_models",
        )
    if cond not in catalog.VARIATION_CONDITIONING[vm]:
        raise SpecError(
            "variations.method",
            f"variations {vm!r} cannot drive {cond}-conditioned generator {m.generator!r}. "
            f"Valid pairs: {_pairs()}",
            code="incompatible_models",
        )
    if sm not in catalog.IMPLEMENTED_SAMPLERS:
        raise SpecError(
            "sampler.method",
            f"sampler {sm!r} is not available in this version; available: "
            f"{sorted(catalog.IMPLEMENTED_SAMPLERS)}",
            code="method_unavailable",
        )
    if vm not in catalog.IMPLEMENTED_VARIATIONS:
        raise SpecError(
            "variations.method",
            f"variations {vm!r} is not available in this version; available: "
            f"{sorted(catalog.IMPLEMENTED_VARIATIONS)}",
            code="method_unavailable",
        )


def check_limits(spec: JobSpec, *, max_identities: int, max_images_per_identity: int,
                 max_total_images: int) -> None:
    """Refuse (never truncate) a spec over the service's limits."""
    if spec.identities > max_identities:
        raise SpecError("identities", f"{spec.identities} identities is over the limit of "
                        f"{max_identities}", code="over_limit")
    if spec.images_per_identity > max_images_per_identity:
        raise SpecError("images_per_identity", f"{spec.images_per_identity} images per identity "
                        f"is over the limit of {max_images_per_identity}", code="over_limit")
    last = spec.output.label_offset + spec.identities - 1
    if last > MAX_LABEL:
        raise SpecError("output.label_offset", f"labels {spec.output.label_offset} .. {last} pass {MAX_LABEL}, "
                        "the largest label RecordIO's float32 holds exactly", code="over_limit")
    total = spec.identities * spec.images_per_identity
    if total > max_total_images:
        raise SpecError("images_per_identity", f"{spec.identities} x {spec.images_per_identity} = "
                        f"{total} images is over the limit of {max_total_images}",
                        code="over_limit")
