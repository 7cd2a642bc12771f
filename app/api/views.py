"""Public representations of job records."""

from __future__ import annotations

from typing import Any

from app.jobstore import STATUSES, TERMINAL


def job_view(job: dict[str, Any], base: str = "") -> dict[str, Any]:
    jid = job["id"]
    return {
        "id": jid,
        "status": job["status"],
        "stage": job.get("stage"),
        "progress": job["progress"],
        "created_at": job["created_at"],
        "updated_at": job["updated_at"],
        "timestamps": {s: job[f"{s}_at"] for s in STATUSES if f"{s}_at" in job},
        "terminal": job["status"] in TERMINAL,
        "spec": job["spec"],
        "spec_hash": job["spec_hash"],
        "result": job.get("result"),
        "error": job.get("error"),
        "priority": job.get("priority"),
        "priority_note": job.get("priority_note"),
        "stages": job.get("stages", {}),
        "retention_days": round(job["retention_s"] / 86400, 6) if job.get("retention_s") else None,
        "expires_at": job.get("expires_at"),
        "deletion_requested_at": job.get("deletion_requested_at"),
        "deleted_at": job.get("deleted_at"),
        "links": {
            "self": f"{base}/v1/jobs/{jid}",
            "events": f"{base}/v1/jobs/{jid}/events",
            "artifacts": f"{base}/v1/jobs/{jid}/artifacts",
            "cancel": f"{base}/v1/jobs/{jid}/cancel",
            "delete": f"{base}/v1/jobs/{jid}",
        },
    }
