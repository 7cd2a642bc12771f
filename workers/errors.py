"""Why a job task stops short. A failure carries the job error code it fails the job with, so the
task layer (`workers/tasking.py`) turns any of them into a failed job with one clause:

```
Exception
  JobFailure(code)             the job fails with `code` and the message
    QualityShortfall           quality_shortfall: identities short of images after every top-up
    ReferenceUnavailable       reference_unavailable: the leakage check's reference set
    Incomplete                 incomplete: the shards hold fewer images than asked for
    ExclusionUnavailable       exclusion_unavailable: an excluded job or reference set cannot be read
    ExclusionUnreachable       exclusion_unreachable: identities end closer to an excluded one than asked
  Stopped                      the task stops without failing the job
    Canceled                   the job was canceled (between batches)
    JobGone                    the job is terminal, canceled or missing: nothing to do
```

Errors from the other layers carry their codes too: `app.errors.ServiceError.code` (storage, job
store, queue; transient ones are retried first) and `models.modelspec.ModelUnavailable.code`.
Anything else fails the job as `task_error`.
"""

from __future__ import annotations

from typing import ClassVar


class JobFailure(Exception):
    """A task's reason to fail its job; `code` is the job's `error.code`."""

    code: ClassVar[str] = "task_error"


class QualityShortfall(JobFailure):
    """The quality filter left identities short of images after every top-up round."""

    code = "quality_shortfall"


class ReferenceUnavailable(JobFailure):
    """The leakage check's reference set is missing or does not fit the job."""

    code = "reference_unavailable"


class Incomplete(JobFailure):
    """The shards hold fewer images than the job asked for."""

    code = "incomplete"


class ExclusionUnavailable(JobFailure):
    """An entry of `sampler.exclude` (a job's identities, a reference set) is missing or does not fit."""

    code = "exclusion_unavailable"


class ExclusionUnreachable(JobFailure):
    """The sampler could not keep every identity `exclude_min_angle_deg` from the excluded ones."""

    code = "exclusion_unreachable"


class Stopped(Exception):
    """The task stops and the job does not fail."""


class Canceled(Stopped):
    """The job was canceled; raised between batches."""


class JobGone(Stopped):
    """The job is terminal, canceled or missing: nothing to do."""


def failure_code(e: BaseException) -> str:
    """The job error code an exception fails its job with: its `code` attribute (JobFailure,
    ServiceError, ModelUnavailable), else task_error."""
    code = getattr(e, "code", None)
    return code if isinstance(code, str) and code else "task_error"
