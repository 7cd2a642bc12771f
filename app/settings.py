"""Typed service settings, read from `IDFORGE_*` environment variables and validated at start-up."""

from __future__ import annotations

import secrets
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.credentials import KeyEntry, check_team, parse_key_entries, parse_secrets

PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "dev", "development"}


class TeamQuota(BaseModel):
    """One team's quotas in IDFORGE_TEAM_QUOTAS; a field left out takes the settings' default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrent_jobs: int | None = Field(None, ge=0)  # 0 = no limit
    images_per_day: int | None = Field(None, ge=0)  # 0 = no limit


class TeamScheduling(BaseModel):
    """One team's scheduling in IDFORGE_TEAM_SCHEDULING; a field left out takes the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float | None = Field(None, gt=0, le=1000)  # its share of the GPUs against other teams'
    priority: Literal["interactive", "batch"] | None = None  # of its jobs that name none
    interactive_images: int | None = Field(None, ge=0)  # interactive work it may hold; 0 = no cap


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value (a key list, a secret) is never echoed in the error.
    model_config = SettingsConfigDict(env_prefix="IDFORGE_", extra="ignore", frozen=True,
                                      hide_input_in_errors=True)

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
    # Hard limit on one task's run, seconds (None = none): the pool process running it is killed and
    # the task redelivered; that counts as a crash (max_task_attempts), and sampling resumes from its
    # checkpoint. Guards a GPU worker against a task hung inside a library call.
    task_time_limit_s: int | None = Field(6 * 3600, ge=1)
    # Soft limit, seconds (None = none): the task is interrupted where it is and the job fails with
    # code `task_timeout` and a reason naming this setting. Must be below task_time_limit_s.
    task_soft_time_limit_s: int | None = Field(None, ge=1)
    # A running task holds a lease on its (job, task) in Redis for this many seconds and renews it
    # every third of that; a second delivery of the same task (Redis redelivers unacknowledged
    # tasks after visibility_timeout_s) that finds the lease live does not run the work but checks
    # again later. A killed worker's lease lapses after this long, and the redelivery resumes.
    task_lease_s: int = Field(60, ge=3)

    # --- API keys given at start-up (more live hashed in Redis: `idforge keys create`). Comma-
    # separated entries, each
    #     TEAM:KEY[:SCOPES]               the key itself (no ':' or ',' in it), or
    #     TEAM:sha256:HEX[:SCOPES]        its sha256 (`printf %s "$KEY" | sha256sum`), so the
    #                                     environment never holds a usable key;
    # SCOPES is '+'-separated from read, submit, admin (submit implies read); default all three.
    # TEAM is 1-64 of [A-Za-z0-9_.-]. A key belongs to exactly one team. Only digests are kept in
    # memory and compared; `idforge keys revoke KEY_ID` revokes an entry without a restart.
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
    # --- Rate limit per API key (a token bucket in Redis): sustained requests per second (0 = off)
    # and the burst a key may spend at once. Over it: 429 with Retry-After.
    rate_limit_per_s: float = Field(100.0, ge=0)
    rate_limit_burst: int = Field(300, ge=1)
    # Comma-separated teams whose keys are never rate-limited (load tests, trusted pipelines).
    rate_limit_exempt_teams: str = ""
    # --- Quotas per team (0 = no limit). Unfinished (queued, running, canceling) jobs: over it,
    # 429 `quota_concurrent_jobs`. Images submitted per UTC day: 429 `quota_images_per_day` until
    # midnight, or 403 for a job larger than the whole quota.
    max_concurrent_jobs: int = Field(32, ge=0)
    max_images_per_day: int = Field(50_000_000, ge=0)
    # Per-team overrides, JSON: {"ci": {"concurrent_jobs": 100, "images_per_day": 0}}.
    team_quotas: dict[str, TeamQuota] = Field(default_factory=dict)
    # How long an Idempotency-Key is remembered, seconds.
    idempotency_ttl_s: int = Field(24 * 3600, ge=1)
    # Retry-After sent with non-terminal jobs, seconds.
    poll_interval_s: int = Field(2, ge=1)
    # Seconds a job's records other than its hash (progress, shard bits, events, webhook messages,
    # the task ledger) are kept after the job ends; 0 = for ever. The job hash itself, with its
    # final progress, is kept regardless. At least a day when set: webhook retries and late
    # redeliveries read them after the job ends.
    job_keys_ttl_s: int = Field(30 * 86400, ge=0)

    # --- Workers.
    # Identities per render shard: size shards to minutes, well below visibility_timeout_s.
    shard_identities: int = Field(64, ge=1)
    # Identity-sampling optimisers save a resumable checkpoint every this many steps.
    checkpoint_steps: int = Field(50, ge=1)
    # Gallery images rendered per saved chunk (a redelivered task resumes chunk by chunk).
    gallery_chunk: int = Field(256, ge=1)
    # Where model weights live; shipped tiny presets are copied here when missing, and models whose
    # location is an S3 prefix are fetched here (checked against their pins as they arrive).
    model_dir: Path = Path(".idforge/models")
    # The operator's registry file (YAML or JSON): sha256 pins of published weights and each
    # model's location (a directory or s3://bucket/prefix). Empty = the built-in table only.
    model_registry: Path | None = None
    # torch device for workers: "auto" = cuda when available, else cpu.
    device: str = "auto"

    # --- Scheduling of render shards (docs/scheduling.md).
    # Shards released to the pool at once: 0 = the live worker processes that consume `gpu` (from
    # their heartbeats). A very large number releases every shard at once (first in, first out).
    sched_slots: int = Field(0, ge=0)
    # Most shards of one job released at once; 0 = no cap but the pool's.
    sched_job_max_in_flight: int = Field(0, ge=0)
    # Priority of a job whose spec names none, unless its team's entry says otherwise.
    default_priority: Literal["interactive", "batch"] = "interactive"
    # Images of a team's live interactive jobs past which a new job runs as `batch` (it says so);
    # 0 = no cap.
    max_interactive_images: int = Field(100_000, ge=0)
    # Per-team weights, default priorities and interactive caps, JSON:
    # {"ci": {"weight": 2, "priority": "interactive"}, "research": {"priority": "batch"}}.
    team_scheduling: dict[str, TeamScheduling] = Field(default_factory=dict)

    # --- Lifecycle of datasets (docs/lifecycle.md).
    # Days a job's data is kept after the job ends, then deleted by the workers (the record stays, with
    # `deleted_at`); 0 = kept until deleted. A job's `retention_days` overrides its team's default.
    retention_days: float = Field(0.0, ge=0, le=36500)
    # Per-team defaults, JSON: {"ci": 7, "research": 0} (0 = kept until deleted).
    team_retention_days: dict[str, Annotated[float, Field(ge=0, le=36500)]] = Field(default_factory=dict)
    # Seconds between the workers' sweeps for expired jobs (one worker sweeps at a time, whichever
    # takes the sweep's lock in Redis first).
    retention_sweep_s: float = Field(300.0, gt=0, le=86400)
    # A requested deletion whose task has shown no sign of life for this long (its message lost, or
    # it gave up after an outage) is sent again by the sweep. Each attempt of the task renews it.
    deletion_resend_s: float = Field(900.0, gt=0, le=86400)

    # --- Observability.
    # Log lines: "json" (one object per line, with job_id/task/shard in a job's context), "text",
    # or "auto" (text on a terminal, JSON otherwise).
    log_format: Literal["json", "text", "auto"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Bearer token that GET /metrics requires; empty = the scrape endpoint is open (it shows counts,
    # queue lengths and worker names, never a team's name or jobs).
    metrics_token: SecretStr = SecretStr("")
    # Seconds between a worker process's heartbeats; it counts as live for 3 heartbeats.
    worker_heartbeat_s: float = Field(10.0, gt=0, le=300)

    # --- Webhooks (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature headers).
    # Signing secret: `whsec_` + base64 of 24-64 random bytes. Several, space-separated, all sign
    # during a rotation (current one first). Required outside development; in development without
    # one, deliveries go out unsigned.
    webhook_secret: SecretStr = SecretStr("")
    # Deliver to private, loopback, link-local and other non-public addresses (receivers on the
    # service's own network). Off: such URLs are refused at submission (literal IPs) and at
    # delivery (after DNS).
    webhook_allow_private: bool = False
    # Delivery attempts per event, the first included.
    webhook_max_attempts: int = Field(8, ge=1, le=50)
    # Seconds before the second attempt; doubles per attempt (with jitter) up to webhook_backoff_max_s.
    webhook_backoff_s: float = Field(5.0, gt=0)
    # Longest wait between attempts, seconds, Retry-After included; must stay below
    # visibility_timeout_s (a waiting retry is an unacknowledged task).
    webhook_backoff_max_s: float = Field(900.0, gt=0)
    # Connect and read timeout of one attempt, seconds.
    webhook_timeout_s: float = Field(15.0, gt=0, le=120)

    @field_validator("model_registry", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("task_time_limit_s", "task_soft_time_limit_s", mode="before")
    @classmethod
    def _no_limit(cls, v: object) -> object:
        """`IDFORGE_TASK_TIME_LIMIT_S=` (empty) or `none` turns a limit off."""
        return None if isinstance(v, str) and v.strip().lower() in ("", "none") else v

    @model_validator(mode="after")
    def _limits_in_order(self) -> Settings:
        soft, hard = self.task_soft_time_limit_s, self.task_time_limit_s
        if soft is not None and hard is not None and soft >= hard:
            raise ValueError(f"IDFORGE_TASK_SOFT_TIME_LIMIT_S ({soft}) must be below "
                             f"IDFORGE_TASK_TIME_LIMIT_S ({hard})")
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("api_keys")
    @classmethod
    def _parse_keys(cls, v: SecretStr) -> SecretStr:
        parse_key_entries(v.get_secret_value())  # errors name the entry, never the key
        return v

    @field_validator("team_quotas", "team_scheduling", "team_retention_days")
    @classmethod
    def _known_teams(cls, v: dict[str, Any]) -> dict[str, Any]:
        for team in v:
            check_team(team)
        return v

    def team_weight(self, team: str) -> float:
        t = self.team_scheduling.get(team)
        return t.weight if t is not None and t.weight is not None else 1.0

    @property
    def team_weights(self) -> dict[str, float]:
        return {team: self.team_weight(team) for team in self.team_scheduling}

    def team_priority(self, team: str) -> Literal["interactive", "batch"]:
        t = self.team_scheduling.get(team)
        return t.priority if t is not None and t.priority is not None else self.default_priority

    def retention_s(self, team: str, days: float | None = None) -> float:
        """Seconds a job's data is kept after it ends: `days` (the job's own), else its team's
        default, else IDFORGE_RETENTION_DAYS; 0 = until deleted."""
        if days is None:
            days = self.team_retention_days.get(team, self.retention_days)
        return max(0.001, days * 86400) if days > 0 else 0.0  # a positive retention is never 'for ever'

    def interactive_cap(self, team: str) -> int:
        t = self.team_scheduling.get(team)
        return t.interactive_images if t is not None and t.interactive_images is not None \
            else self.max_interactive_images

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        if self.environment != "development":
            if self.secret_key.get_secret_value() in PLACEHOLDER_SECRETS:
                raise ValueError("IDFORGE_SECRET_KEY must be set outside development")
            if not self.key_entries:
                raise ValueError("IDFORGE_API_KEYS must be set outside development")
            if any(k in PLACEHOLDER_SECRETS for k in self.team_keys):
                raise ValueError("IDFORGE_API_KEYS holds a placeholder key")
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("IDFORGE_S3_BUCKET is required when IDFORGE_STORAGE=s3")
        return self

    @model_validator(mode="after")
    def _check_job_keys_ttl(self) -> Settings:
        if 0 < self.job_keys_ttl_s < 86400:
            raise ValueError(f"IDFORGE_JOB_KEYS_TTL_S ({self.job_keys_ttl_s}) must be 0 (keep) or at "
                             "least 86400 (a day)")
        return self

    @model_validator(mode="after")
    def _check_webhooks(self) -> Settings:

        try:
            parse_secrets(self.webhook_secret.get_secret_value())
        except ValueError as e:
            raise ValueError(f"IDFORGE_WEBHOOK_SECRET: {e}") from e
        if self.environment != "development" and not self.webhook_secret.get_secret_value().strip():
            raise ValueError("IDFORGE_WEBHOOK_SECRET must be set outside development "
                             "(whsec_ + base64 of 24-64 random bytes)")
        if self.webhook_backoff_max_s >= self.visibility_timeout_s:
            raise ValueError(f"IDFORGE_WEBHOOK_BACKOFF_MAX_S ({self.webhook_backoff_max_s}) must be "
                             f"below IDFORGE_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s})")
        return self

    @cached_property
    def webhook_keys(self) -> list[bytes]:
        """HMAC keys that sign webhook deliveries (none in development without a secret)."""

        return parse_secrets(self.webhook_secret.get_secret_value())

    @cached_property
    def key_entries(self) -> list[KeyEntry]:
        """The IDFORGE_API_KEYS entries: team, sha256 of the key, scopes."""
        return parse_key_entries(self.api_keys.get_secret_value())

    @cached_property
    def team_keys(self) -> dict[str, str]:
        """Plaintext API key -> team, for the entries given as plaintext."""
        return {e.plaintext: e.team for e in self.key_entries if e.plaintext is not None}

    @property
    def rate_limit_exempt(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.rate_limit_exempt_teams.split(",") if t.strip())

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @cached_property
    def signing_key(self) -> bytes:
        key = self.secret_key.get_secret_value()
        # Development without a key: a per-process random key (URLs die with the process).
        return key.encode() if key else secrets.token_bytes(32)
