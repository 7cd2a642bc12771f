"""A job that continues a preview (`from_preview`) takes what the preview computed instead of
computing it again: the sampled identities (every identity: a preview samples the whole job) and the
preview's rendered shards, copied object by object inside the store.

The full job's shard plan breaks at the preview's identity count (`JobSpec.shard_plan`), so its first
shards are the preview's, identity for identity, and their objects are what rendering them again
would write (same seed, identities, models and spec; the API refused any difference). Reuse only
saves work: whatever of the preview is gone by now (its data deleted meanwhile) is computed again,
with the same result.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from app.errors import StorageKeyMissing
from app.layout import JobKeys
from app.preview import first_difference
from app.spec import JobSpec
from app.storage import Storage, copy_many

log = logging.getLogger("idforge.worker")


def source_id(spec: JobSpec) -> str | None:
    """The id of the preview the job continues, or None."""
    p = spec.continued_preview
    return p.job if p is not None else None


def _source(spec: JobSpec, prefix: str) -> JobKeys | None:
    job = source_id(spec)
    return JobKeys.for_job(prefix, job) if job is not None else None


def _same_data(spec: JobSpec, storage: Storage, src: JobKeys) -> bool:
    """Whether the preview's stored spec makes this job's data (the API checked it on submission;
    this guards every copy): a difference, or no stored spec, means render instead."""
    try:
        theirs = json.loads(storage.get_bytes(src.spec))
    except StorageKeyMissing:
        return False
    field = first_difference(spec.normalized(), theirs)
    if field is not None:
        log.error("preview %s differs from this job in %s; rendering instead of copying", src.root, field)
    return field is None


def take_identities(spec: JobSpec, storage: Storage, prefix: str, keys: JobKeys) -> bool:
    """Copy the preview's identities (and what its sampler reported); False when there is no
    preview to take them from."""
    src = _source(spec, prefix)
    if src is None or not _same_data(spec, storage, src):
        return False
    try:
        storage.copy(src.identity_stats, keys.identity_stats)
        storage.copy(src.identities, keys.identities)  # last: its presence means the set is saved
    except StorageKeyMissing as e:
        log.warning("preview %s: no identities to take (%s); sampling them again", src.root, e)
        return False
    return True


def take_shard(spec: JobSpec, storage: Storage, prefix: str, keys: JobKeys, shard: int,
               ids: range) -> dict[str, Any] | None:
    """Copy shard `shard` (identities `ids`) from the preview, its file list last; returns the file
    list, or None when the preview has no such shard (the job renders it)."""
    src = _source(spec, prefix)
    if src is None or ids.stop > spec.reused_identities or not _same_data(spec, storage, src):
        return None
    try:
        done: dict[str, Any] = json.loads(storage.get_bytes(src.shard_done(shard)))
    except StorageKeyMissing:
        return None
    if done.get("identities") != list(ids):  # another plan (cannot happen for a preview the API accepted)
        return None
    rels = [f["path"] for f in done["files"] if f.get("path")] + sorted(done.get("outputs", {}))
    rels.append(keys.relative(keys.shard_features(shard)))
    latents = keys.relative(keys.shard_latents(shard))
    if storage.exists(src.key(latents)):
        rels.append(latents)
    try:
        copy_many(storage, [(src.key(rel), keys.key(rel)) for rel in rels])
    except StorageKeyMissing as e:
        log.warning("preview %s shard %d: incomplete (%s); rendering it", src.root, shard, e)
        return None
    record = {**done, "reused_from": source_id(spec)}
    storage.put_bytes(keys.shard_done(shard), json.dumps(record, sort_keys=True).encode(), "application/json")
    return record
