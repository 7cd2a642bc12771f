"""Typed service settings, read from `IDFORGE_*` environment variables and validated at start-up."""

from __future__ import annotations

import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "dev", "development"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IDFORGE_", extra="ignore", frozen=True)

    # "development" allows placeholder secrets; anything else refuses them at start-up.
    environment: Literal["development", "production"] = "development"

    # --- Redis: the job store, and the Celery broker unless broker_url is set.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Celery broker URL; empty = redis_url.
    broker_url: str = ""
    # Seconds Redis waits before redelivering an unacknowledged task; must exceed the longest task.
    visibility_timeout_s: int = Field(3600, ge=10)
    # Deliveries of one task after which the job fails instead of looping on a crashing worker.
    max_task_attempts: int = Field(3, ge=1)

    # --- API keys: comma-separated `team:key` pairs. A key belongs to exactly one team.
    api_keys: SecretStr = SecretStr("")
    # Signs the URLs of the local storage backend (the embedded default's "presigned" URLs).
    secret_key: SecretStr = SecretStr("")

    # --- Storage: "local" (a directory, the embedded default) or "s3" (any S3-compatible server).
    storage: Literal["local", "s3"] = "local"
    storage_dir: Path = Path(".idforge/storage")
    s3_bucket: str = "idforge"
    # Key prefix under which every job lives: {prefix}/{job_id}/...
    s3_prefix: str = "jobs"
    # Endpoint override for S3-compatible servers (MinIO, SeaweedFS); empty = AWS.
    s3_endpoint_url: str = ""
    # Endpoint that clients download from, when it differs from the one the service reaches
    # (e.g. `http://minio:9000` inside compose vs `http://localhost:9000` outside); empty = same.
    s3_public_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: SecretStr = SecretStr("")
    # Lifetime of presigned download URLs, seconds.
    presign_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600)

    # --- Public address of the API, used to build local-storage download URLs and Location headers.
    public_url: str = "http://127.0.0.1:8000"

    # --- Limits: requests over these are refused with 4xx, never truncated.
    max_identities: int = Field(1_000_000, ge=1)
    max_images_per_identity: int = Field(1024, ge=1)
    max_total_images: int = Field(50_000_000, ge=1)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    # How long an Idempotency-Key is remembered, seconds.
    idempotency_ttl_s: int = Field(24 * 3600, ge=1)
    # Retry-After sent with non-terminal jobs, seconds.
    poll_interval_s: int = Field(2, ge=1)

    # --- Workers.
    # Identities per render shard: size shards to minutes, well below visibility_timeout_s.
    shard_identities: int = Field(64, ge=1)
    # Identity-sampling optimisers save a resumable checkpoint every this many steps.
    checkpoint_steps: int = Field(50, ge=1)
    # Gallery images rendered per saved chunk (a redelivered task resumes chunk by chunk).
    gallery_chunk: int = Field(256, ge=1)
    # Where model weights live; tiny presets are built here when missing, and models whose
    # location is an S3 prefix are fetched here (checked against their pins as they arrive).
    model_dir: Path = Path(".idforge/models")
    # The operator's registry file (YAML or JSON): sha256 pins of published weights and each
    # model's location (a directory or s3://bucket/prefix). Empty = the built-in table only.
    model_registry: Path | None = None
    # torch device for workers: "auto" = cuda when available, else cpu.
    device: str = "auto"

    @field_validator("model_registry", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("api_keys")
    @classmethod
    def _parse_keys(cls, v: SecretStr) -> SecretStr:
        for pair in filter(None, (p.strip() for p in v.get_secret_value().split(","))):
            team, sep, key = pair.partition(":")
            if not sep or not team or not key:
                raise ValueError("IDFORGE_API_KEYS must be comma-separated 'team:key' pairs")
        return v

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        if self.environment != "development":
            if self.secret_key.get_secret_value() in PLACEHOLDER_SECRETS:
                raise ValueError("IDFORGE_SECRET_KEY must be set outside development")
            if not self.team_keys:
                raise ValueError("IDFORGE_API_KEYS must be set outside development")
            if any(k in PLACEHOLDER_SECRETS for k in self.team_keys):
                raise ValueError("IDFORGE_API_KEYS holds a placeholder key")
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("IDFORGE_S3_BUCKET is required when IDFORGE_STORAGE=s3")
        return self

    @cached_property
    def team_keys(self) -> dict[str, str]:
        """API key -> team."""
        out: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in self.api_keys.get_secret_value().split(","))):
            team, _, key = pair.partition(":")
            out[key.strip()] = team.strip()
        return out

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @cached_property
    def signing_key(self) -> bytes:
        key = self.secret_key.get_secret_value()
        # Development without a key: a per-process random key (URLs die with the process).
        return key.encode() if key else secrets.token_bytes(32)
