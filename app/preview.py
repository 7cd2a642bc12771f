"""`preview` and `from_preview`: look at a job's first identities before paying for all of them.

A preview (`preview: {identities: K}`) samples every identity of the job, as the full job would,
and renders the first K: the first shards of the full job's plan. A full job posted with
`from_preview: ID` is resolved here against the preview's stored spec, so that it is the job the
preview previewed:

- the preview's normalised spec gives the defaults, as for `extends` (`app.extension`): every field
  but `metadata`, `webhook` and `preview`; a field the request gives wins;
- every field that changes the data (all but `metadata`, `webhook`, `preview` and `from_preview`)
  must then equal the preview's, or the request is refused naming the first that differs;
- `from_preview` is stored as {job, identities}: the full job's shard plan breaks at K
  (`JobSpec.shard_plan`), so its first shards are the preview's and the workers copy them
  (`workers.preview`), with the sampled identities.
"""

from __future__ import annotations

from typing import Any

from app.extension import merge
from app.spec import NOT_DATA

NOT_INHERITED = frozenset({"metadata", "webhook", "preview", "from_preview"})
NOT_COMPARED = NOT_DATA | {"preview", "from_preview"}


class PreviewError(ValueError):
    """A request that cannot continue the preview it names; `field` is the dotted path it names."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def resolve(request: dict[str, Any], preview: dict[str, Any]) -> dict[str, Any]:
    """The whole spec data of `request` (which has `from_preview`) from `preview`, the job record
    it names (id, spec = its normalised spec, which has `preview`)."""
    theirs: dict[str, Any] = preview["spec"]
    base = {k: v for k, v in theirs.items() if k not in NOT_INHERITED}
    out: dict[str, Any] = merge(base, {k: v for k, v in request.items() if k != "from_preview"}, "")
    out["from_preview"] = {"job": preview["id"], "identities": int(theirs["preview"]["identities"])}
    return out


def first_difference(ours: Any, theirs: Any, path: str = "") -> str | None:
    """The dotted path of the first value that differs between two normalised specs, or None."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for k in sorted(set(ours) | set(theirs)):
            if not path and k in NOT_COMPARED:
                continue
            got = first_difference(ours.get(k), theirs.get(k), f"{path}.{k}" if path else k)
            if got is not None:
                return got
        return None
    return None if ours == theirs else (path or "(body)")


def check_same_data(normalized: dict[str, Any], preview: dict[str, Any]) -> None:
    """PreviewError naming the first field of the full job's normalised spec whose value would make
    other data than the preview's."""
    theirs = preview["spec"]
    field = first_difference(normalized, theirs)
    if field is None:
        return
    ours_v, theirs_v = _at(normalized, field), _at(theirs, field)
    raise PreviewError(field, f"{ours_v!r} here, {theirs_v!r} in preview {preview['id']}: a job from a "
                       "preview makes the preview's dataset (all of it), so every field but metadata and "
                       "webhook must be the preview's; make a new preview to change it")


def _at(data: Any, path: str) -> Any:
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data
