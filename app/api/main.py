"""The FastAPI application: `create_app(settings)` wires the services in a lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import openapi, problems
from app.api.auth import KeyRing
from app.api.deps import Services
from app.api.routes import files, jobs, keys, system, ui
from app.jobstore import JobStore
from app.lifecycle import Lifecycle
from app.logs import RequestLogContext
from app.queue import TaskQueue
from app.scheduler import Scheduler
from app.settings import Settings
from app.storage import Storage, storage_from_settings

log = logging.getLogger("idforge.api")


def create_app(settings: Settings | None = None, *, store: JobStore | None = None,
               storage: Storage | None = None, queue: TaskQueue | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        job_store = store or JobStore.from_url(settings.redis_url, keys_ttl_s=settings.job_keys_ttl_s)
        app.state.services = Services(
            settings=settings,
            store=job_store,
            storage=storage or storage_from_settings(settings),
            queue=queue or TaskQueue.from_settings(settings),
            scheduler=Scheduler.for_service(job_store.r, settings),
            lifecycle=Lifecycle(job_store),
        )
        app.state.keyring = KeyRing(
            app.state.services.store.r, settings.key_entries, rate_per_s=settings.rate_limit_per_s,
            burst=settings.rate_limit_burst, exempt_teams=settings.rate_limit_exempt)
        if not settings.key_entries:
            log.warning("IDFORGE_API_KEYS is empty: only keys made with `idforge keys create` work")
        yield

    app = FastAPI(
        title="idforge",
        version=__version__,
        summary="Synthetic face-recognition datasets on demand",
        lifespan=lifespan,
    )
    problems.install(app)
    app.add_middleware(RequestLogContext)
    app.include_router(jobs.router)
    app.include_router(files.router)
    app.include_router(system.router)
    app.include_router(keys.router)
    app.include_router(ui.router)
    openapi.install(app)
    app.add_middleware(openapi.AllowHeader)
    return app
