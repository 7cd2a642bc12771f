"""`extends`: a job that grows an existing dataset (its parent).

The API resolves a request with `extends` into a whole spec before validating it, so the stored
spec says everything the workers need and the job reproduces without its parent's record:

- the parent's normalised spec gives the defaults: every field but `metadata` and `webhook` (they
  describe the parent's request) and `seed`; a field the request gives wins, objects merged field
  by field, lists and values replaced; but `sampler` and `variations` are taken whole, the request's
  when it gives one, else the parent's (their fields depend on the method and on each other: a
  `scale` given over a parent's `cone_degrees` means the Gaussian, not both);
- `seed`: the request's, else derived from the parent's id and seed (`child_seed`), so that two
  extensions of one parent asked for alike are one dataset, and an extension is not its parent's
  identities redrawn;
- `sampler.exclude`: what the parent excluded, what the request excludes, and the parent itself,
  so a family stays disjoint however long it grows (each generation adds one entry; 64 at most);
- `output.label_offset`: the parent's offset + its identities, so labels continue after the
  parent's; a request may give a larger one, never one that overlaps the parent's labels.

The generator and the embedder must be the parent's: identities of another space cannot be
excluded (`jobs_service.check_exclusions` says so, naming the entry).
"""

from __future__ import annotations

import hashlib
from typing import Any

NOT_INHERITED = frozenset({"metadata", "webhook", "seed", "extends", "preview", "from_preview"})
WHOLE_BLOCKS = frozenset({"sampler", "variations"})  # taken whole from the request or the parent


class ExtensionError(ValueError):
    """A request whose extension cannot be resolved; `field` is the dotted path it names."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def child_seed(parent_id: str, parent_seed: int) -> int:
    """The default seed of an extension: 63 bits of sha256("{parent id}:{parent seed}:extends")."""
    digest = hashlib.sha256(f"{parent_id}:{parent_seed}:extends".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def merge(base: Any, over: Any, path: str) -> Any:
    if not isinstance(base, dict) or not isinstance(over, dict):
        return over
    if path in WHOLE_BLOCKS:
        return over
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k), v, f"{path}.{k}" if path else k) if k in base else v
    return out


def resolve(request: dict[str, Any], parent: dict[str, Any]) -> dict[str, Any]:
    """The whole spec data of `request` (which has `extends`) from `parent`, the job record it names
    (id, spec = its normalised spec); ExtensionError naming the field when the request contradicts
    the parent."""
    theirs: dict[str, Any] = parent["spec"]
    base = {k: v for k, v in theirs.items() if k not in NOT_INHERITED}
    out: dict[str, Any] = merge(base, {k: v for k, v in request.items() if k != "extends"}, "")
    out["extends"] = parent["id"]
    if "seed" not in request:
        out["seed"] = child_seed(parent["id"], int(theirs.get("seed", 0)))

    sampler = out.get("sampler")
    if not isinstance(sampler, dict):
        raise ExtensionError("sampler", "expected an object")
    asked = sampler.get("exclude", [])  # the request's, or the parent's with its sampler
    if isinstance(asked, list):  # else the spec's own validation names the field
        exclude: list[Any] = []
        for name in [*((theirs.get("sampler") or {}).get("exclude") or []), *asked, parent["id"]]:
            if name not in exclude:
                exclude.append(name)
        out["sampler"] = {**sampler, "exclude": exclude}

    end = int((theirs.get("output") or {}).get("label_offset", 0)) + int(theirs["identities"])
    output = out.get("output")
    if not isinstance(output, dict):
        raise ExtensionError("output", "expected an object")
    given = (request.get("output") or {}).get("label_offset") if isinstance(request.get("output"), dict) else None
    if given is None:
        out["output"] = {**output, "label_offset": end}
    elif isinstance(given, int) and not isinstance(given, bool) and given < end:
        raise ExtensionError("output.label_offset", f"labels from {given} would overlap job {parent['id']}'s, "
                             f"which end at {end - 1}: give {end} or more, or leave it out")
    return out
