"""What both pipelines share: how a pipeline talks to its caller, what identity sampling returns,
and batching."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from app.spec import JobSpec
from models.alignment.cropper import Cropper
from workers.errors import Canceled
from workers.runtime import ModelCache


@dataclass
class Hooks:
    """How a pipeline talks to its caller: progress, events and cancellation.

    progress(done, total, unit): a stage's steps (identities, gallery images, optimiser steps);
    shard_progress(identities_done, images_done): a shard's identities and images written so far;
    event(type, **data): a job event (resumed, checkpoint, identities_packed);
    should_stop(): True when the job is being canceled (`check` raises `Canceled` then).
    """

    progress: Callable[[int, int, str], None] = lambda done, total, unit: None
    shard_progress: Callable[[int, int], None] = lambda identities_done, images_done: None
    event: Callable[..., None] = lambda type_, **data: None
    should_stop: Callable[[], bool] = lambda: False

    def check(self) -> None:
        if self.should_stop():
            raise Canceled()


@dataclass
class Sampled:
    embeddings: torch.Tensor  # [N, D] unit rows
    stats: dict[str, Any] = field(default_factory=dict)
    latents: torch.Tensor | None = None  # [N, W] W latents, for latent generators


def batched(items: list[Any], size: int) -> Iterator[list[Any]]:
    for b0 in range(0, len(items), size):
        yield items[b0:b0 + size]


def shard_parts(spec: JobSpec, models: ModelCache) -> tuple[Any, Cropper, Any]:
    """A shard's job embedder, the generator's cropper and, when the job has a quality report, the
    independent evaluator (else None), which embeds the images too."""
    name = spec.models.generator
    embedder = models.embedder(spec.models.embedder)
    crop = models.cropper(name)
    evaluator = models.evaluator() if spec.quality.report else None
    return embedder, crop, evaluator
