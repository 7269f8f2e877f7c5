"""Ray Serve deployment with a FastAPI ingress around :class:`distunmix.serve.service.SeparationService`.

``serve run distunmix.serve.app:build_app`` (or ``serve run serve/config.yaml``) builds it;
``distunmix serve`` starts the same app with flags.

Routes: ``POST /separate`` (raw body or multipart field ``file``; query ``targets``, ``format``,
``niter``) returns one stem or a ZIP; ``POST /jobs`` starts a long job, ``GET /jobs/{id}`` reports
it and ``GET /jobs/{id}/{target}`` downloads a stem; ``/stream`` is a WebSocket for live
separation with unidirectional models (:mod:`.streaming`); ``GET /models`` and ``GET /healthz``.
Short clips arriving together are separated as one batch (``@serve.batch``).
"""

# no "from __future__ import annotations": FastAPI reads the route signatures' annotations at runtime
import asyncio
import contextlib
import gc
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException

from ..cluster import ray_session
from ..errors import CheckpointError, ConfigError
from ..storage import is_uri
from . import proxy, streaming
from .catalog import ModelCatalog
from .client import ATTEMPT_HEADER
from .jobfiles import open_job_files
from .jobs import JobStore, default_job_dir
from .metrics import Metrics
from .service import (
    FORMATS,
    PROBE_BYTES,
    Clip,
    LoopWatchdog,
    SeparationService,
    ServiceConfig,
    ServiceError,
    UploadReader,
)
from .streaming import StreamBatcher, StreamClose, StreamSession

log = logging.getLogger(__name__)

# API docs are off unless ServiceConfig.api_docs turns them on (routes below): no schema for strangers
app = FastAPI(title="distunmix", description="Open-Unmix source separation", docs_url=None, redoc_url=None,
              openapi_url=None)  # fmt: skip
UPLOAD_GRACE_S = 10.0  # the minimum upload rate applies after this
UPLOAD_POLL_S = 0.25  # how often a waiting upload checks its clocks
EVICT_IDLE_S = 1.0  # an upload silent this long may be dropped for a newcomer when all slots are taken
REFUSED = frozenset({400, 413, 415, 422})  # statuses that refuse the client's own request or body
MAX_HELD_BACK = 16  # refusals delayed at once (refusal_delay_s); more are answered at once
ROUTES = (
    "POST /separate, POST /jobs, GET /jobs/{id}, GET /jobs/{id}/{target}, GET /models, GET /healthz, WebSocket /stream"
)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error the app returns: JSON ``{"error": message}``."""
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


@app.exception_handler(ServiceError)
async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    retry = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after is not None else None
    return _error(exc.status, exc.message, retry)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        message = f"no route {where}; the routes are {ROUTES}"
    elif exc.status_code == 405:
        allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "?")
        message = f"{where}: method not allowed here (allowed: {allowed})"
    else:
        message = f"{where}: {exc.detail}"
    return _error(exc.status_code, message, dict(exc.headers) if exc.headers else None)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
    return _error(422, f"invalid request: {problems}")


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)  # the details stay in the replica's log
    return _error(500, "the server failed to process this request; it was logged, and the server goes on")


# Module helpers the deployment uses are defined above it: @serve.deployment pickles the class where it
# stands, and names defined further down are missing in the replicas.
async def _receive(ws: WebSocket, idle_s: float) -> dict[str, Any]:
    """The next frame of a stream, or StreamClose when none comes within ``idle_s``."""
    try:
        message = await asyncio.wait_for(ws.receive(), idle_s)
    except TimeoutError:
        raise StreamClose(streaming.POLICY, f"nothing arrived for {idle_s:g} s (stream_idle_s)") from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message


async def _close(ws: WebSocket, error: StreamClose) -> None:
    """The whole message as an error frame, then the close code with the message as its reason."""
    with contextlib.suppress(Exception):  # the client may be gone already
        await ws.send_text(json.dumps({"type": "error", "code": error.code, "error": error.message}))
        await ws.close(error.code, error.reason)


PAGE_TYPES = {"index.html": "text/html; charset=utf-8", "page.js": "text/javascript; charset=utf-8",
              "page.css": "text/css; charset=utf-8"}  # fmt: skip
PAGE = {name: (resources.files(__package__) / "page" / name).read_bytes() for name in PAGE_TYPES}  # package data
PAGE_HEADERS = {  # the page loads nothing from elsewhere, and nothing may frame it
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss: blob:; media-src 'self' blob:; "
    "img-src 'self' data: blob:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class Loaded:
    """A multiplexed model in Serve's LRU; unloading it (``__del__``, which Serve calls) drops it
    from the replica's list."""

    def __init__(self, service: SeparationService, owner: Any) -> None:
        self.service, self.owner = service, owner

    def __del__(self) -> None:
        if self.owner is not None and self.owner._loaded.pop(self.service.name, None) is not None:
            self.owner.evicted += 1
            log.info("unloaded model %s (least recently used)", self.service.name)
        self.owner = None


@dataclass(eq=False)  # compared by identity
class Upload:
    """A body being read: when it started, when a piece last arrived, its bytes, whether dropped."""

    start: float
    last: float
    bytes: int
    evicted: bool = False


# max_ongoing_requests leaves room beyond max_uploads (64), the separations (16) and the held-back
# refusals (16), so /healthz and /models always find a slot; the app bounds uploads and work itself.
# Beyond max_queued_requests, Ray Serve's proxy answers 503 itself, with Retry-After.
@serve.deployment(name="Separator", max_ongoing_requests=128, max_queued_requests=128, health_check_period_s=10,
                  backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1.0))  # fmt: skip
@serve.ingress(app)
class SeparatorDeployment:
    """One replica: a loaded model, a job store, and a batcher for short clips."""

    def __init__(self, config: ServiceConfig) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.config = config
        self.catalog = ModelCatalog.of(config.model, config.models_root)
        # the default model stays loaded; the others are Serve's multiplexed models, LRU per replica
        self.default = SeparationService(replace(config, model=self.catalog.folder(self.catalog.default)),
                                         self.catalog.default)  # fmt: skip
        self._loaded: dict[str, SeparationService] = {}  # the multiplexed models loaded now
        self.evicted = 0  # multiplexed models unloaded to make room
        self.user_config_error: str | None = None  # why the last user_config was refused

        async def load(name: str) -> Loaded:
            service = await asyncio.to_thread(self._new_service, name)
            return Loaded(service, self)

        self._load = serve.multiplexed(max_num_models_per_replica=config.max_models)(load)
        # one private folder for every replica on this node, so any replica can answer for any job
        self.jobs = JobStore(config.job_dir or default_job_dir(), config.job_ttl_s,
                             int(config.job_quota_mb * 2**20), config.job_lease_s)  # fmt: skip
        self.batch_max_seconds = config.batch_max_seconds
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._separate_batch.set_max_batch_size(config.batch_size)
        self._separate_batch.set_batch_wait_timeout_s(config.batch_wait_s)
        self.watchdog = LoopWatchdog()
        self._uploads: list[Upload] = []  # bodies being read now (one event loop: no lock)
        self._held_back = 0  # refusals waiting out refusal_delay_s
        self._pending = 0  # requests separating or waiting to
        self._jobs = 0  # jobs held: accepted, queued or running
        self._idle = asyncio.Event()  # set while no request separates or waits: jobs run then
        self._idle.set()
        self._seconds_per_item = 1.0  # running mean of a separation's wall time (for Retry-After)
        self._queue: asyncio.Queue[tuple[str, list[str], str, int]] = asyncio.Queue()
        self._held: set[str] = set()  # jobs of this replica, queued or running (their heartbeats)
        self._background: list[asyncio.Task] = []
        self._streams = 0  # live /stream connections
        self.stream_batcher = StreamBatcher()  # their blocks, separated together when they meet
        self.metrics = Metrics()
        # what exists now (Ray, torch, the models) lives as long as the replica: out of the
        # collector's sight, a full collection no longer walks it (one took 116 ms mid-run here,
        # five late blocks of a live stream)
        gc.collect()
        gc.freeze()

    def _new_service(self, name: str) -> SeparationService:
        service = SeparationService(replace(self.config, model=self.catalog.folder(name)), name)
        self._loaded[name] = service
        return service

    async def _service(self, name: str | None = None) -> SeparationService:
        """The service of model ``name`` (else the multiplexed model id of the request's header, else
        the default), loaded on first use; 404 for a model that is not served."""
        name = name or serve.get_multiplexed_model_id() or self.catalog.default
        if name == self.catalog.default:
            return self.default
        self.catalog.folder(name)  # 404 before anything is loaded
        try:
            return (await self._load(name)).service
        except (CheckpointError, RuntimeError) as e:
            log.exception("model %s cannot be loaded", name)
            raise ServiceError(503, f"model {name!r} cannot be loaded on this replica ({type(e).__name__}); the "
                                    "error is in its log", retry_after=30) from None  # fmt: skip

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's user_config: limits, batching and the default model, applied to the running
        replica (no restart). One that cannot apply (an unknown setting or value, a model that is
        not there, or the model folders, backend, device or max_models, which need a new
        deployment) is refused whole: logged, named in ``/models``, and the replica goes on as it was."""
        try:
            self._reconfigure(dict(user_config or {}))
            self.user_config_error = None
        except (ConfigError, CheckpointError, RuntimeError, ServiceError) as e:
            self.user_config_error = f"user_config refused, nothing changed: {e}"
            log.error("%s", self.user_config_error)

    def _reconfigure(self, user_config: dict[str, Any]) -> None:
        fixed = sorted(set(user_config) & {"models_root", "backend", "device", "max_models"})
        if fixed:
            raise ConfigError(f"{', '.join(fixed)} cannot change on running replicas; deploy anew")
        ServiceConfig.from_mapping(user_config)  # names and values checked
        config = replace(self.config, **user_config)
        catalog, default = self.catalog, self.default
        model = user_config.get("model")
        if model is not None and model != self.catalog.default:
            if config.models_root and model not in self.catalog.folders:
                raise ConfigError(f"model {model!r}; expected one of {', '.join(self.catalog.folders)}")
            catalog = replace(catalog, default=model) if config.models_root else ModelCatalog.of(model, None)
            default = SeparationService(replace(config, model=catalog.folder(catalog.default)), catalog.default)
        self.config, self.catalog, self.default = config, catalog, default
        for service in (self.default, *self._loaded.values()):
            service.config = replace(config, model=service.config.model)
        self._separate_batch.set_max_batch_size(config.batch_size)
        self._separate_batch.set_batch_wait_timeout_s(config.batch_wait_s)
        self.batch_max_seconds = config.batch_max_seconds
        log.warning("user_config applied: %s", ", ".join(sorted(user_config)) or "(nothing)")

    def _start_background(self) -> None:
        """The job worker, the job heartbeats and the expiry timer (on the replica's event loop)."""
        if not self._background:
            loop = asyncio.get_running_loop()
            self.watchdog.start()
            self._background = [loop.create_task(c) for c in (self._job_worker(), self._beat(), self._expire())]

    async def _beat(self) -> None:
        """Beat the heartbeat of this replica's jobs, and take over those of replicas that stopped
        (a store that cannot be reached now is tried again at the next beat)."""
        while True:
            await asyncio.sleep(self.config.job_lease_s / 3)
            try:
                await self._beat_once()
            except Exception:
                log.exception("the job store %s: heartbeat or takeover failed; trying again", self.jobs.root)

    async def _beat_once(self) -> None:
        await asyncio.to_thread(self.jobs.touch, sorted(self._held))
        for job_id in await asyncio.to_thread(self.jobs.orphans):
            if self._jobs >= self.config.max_jobs:
                break
            record = await asyncio.to_thread(self.jobs.claim, job_id, self.replica)
            if record is None:
                continue
            try:  # the record was written by another replica, maybe of another model or limits
                service = await self._service(str(record.get("model") or self.catalog.default))
                names = service.parse_targets(",".join(record["targets"]))
                job = (job_id, service.name, names, service.parse_format(record["format"]),
                       service.parse_niter(record.get("niter", 1)))  # fmt: skip
            except ServiceError as e:
                log.warning("job %s of a stopped replica cannot run here: %s", job_id, e.message)
                await asyncio.to_thread(self.jobs.update, job_id, {"status": "failed", "error": e.message})
                continue
            log.info("took over job %s (its replica stopped)", job_id)
            self._jobs += 1
            self._held.add(job_id)
            self._queue.put_nowait(job)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(min(self.config.job_ttl_s / 4, 60.0))
            try:
                await asyncio.to_thread(self.jobs.expire)
            except Exception:
                log.exception("the job store %s: expiry failed; trying again", self.jobs.root)

    def _check_room(self, job: bool) -> None:
        """503, with when to try again, when this replica holds as many separations (a request's,
        or a job's) as it may."""
        config = self.config
        held, limit = (self._jobs, config.max_jobs) if job else (self._pending, config.max_pending)
        if held >= limit:
            wait = min(600.0, max(1.0, (self._pending + self._jobs) * self._seconds_per_item))
            what = "jobs" if job else "separations"
            raise ServiceError(503, f"this replica holds {held} {what} already; try again in about {wait:.0f} s",
                               retry_after=wait)  # fmt: skip

    def _reserve(self, job: bool) -> None:
        """Hold a place for one separation (a request's, or a job's), or 503 (:meth:`_check_room`)."""
        self._check_room(job)
        if job:
            self._jobs += 1
            self.metrics.job_queue.set(self._jobs)
        else:
            self._pending += 1
            self._idle.clear()

    def _release(self, seconds: float, job: bool = False) -> None:
        if job:
            self._jobs -= 1
            self.metrics.job_queue.set(self._jobs)
        else:
            self._pending -= 1
            if self._pending == 0:
                self._idle.set()
        if seconds > 0:
            self._seconds_per_item = 0.8 * self._seconds_per_item + 0.2 * seconds

    async def check_health(self) -> None:
        """Serve's health check: the event loop answers (a blocked one times this check out) and
        was not blocked longer than ``max_loop_block_s``, and the model gives finite output."""
        self._start_background()
        self.watchdog.check(self.config.max_loop_block_s)
        await asyncio.to_thread(self.default.healthy)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _separate_batch(self, items: list[tuple[SeparationService, Any, int]]) -> list[Any]:
        """Clips of one model are separated together (each model's batch in turn)."""
        out: list[Any] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (service, _, _) in enumerate(items):
            groups.setdefault(id(service), []).append(i)
        for members in groups.values():
            service = items[members[0]][0]
            clips, niters = [items[i][1] for i in members], [items[i][2] for i in members]
            for i, stems in zip(members, await asyncio.to_thread(service.separate_batch, clips, niters), strict=True):
                out[i] = stems
        return out

    async def _read_upload(self, request: Request, service: SeparationService) -> bytes:
        """The audio bytes of a raw or multipart body, refusing oversized ones before reading them.

        At most ``max_uploads`` bodies are read at once. When all are taken, the one that has
        sent nothing for longest (over ``EVICT_IDLE_S``) is dropped for the newcomer, else the
        newcomer gets 503: stalled clients never hold the slots of working ones. A body that stalls
        for ``upload_idle_s``, arrives slower than ``min_upload_kib_s`` or not within
        ``upload_timeout_s`` gets 408."""
        config = self.config
        limit = config.max_upload_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit + 64 * 1024:
            raise ServiceError(413, f"upload of {length} bytes exceeds the limit of {limit}")
        reader = UploadReader(request.headers.get("content-type", ""), limit)
        loop = asyncio.get_running_loop()
        declared = int(length) if length and length.isdigit() else 0
        upload = self._admit(loop.time(), declared)
        chunks = request.stream().__aiter__()
        pending: asyncio.Future | None = None
        probed = False
        try:
            while True:
                now = loop.time()
                elapsed = now - upload.start
                if upload.evicted:
                    raise ServiceError(408, "the upload stalled while other uploads waited, and was dropped")
                if elapsed > UPLOAD_GRACE_S and reader.received < config.min_upload_kib_s * 1024 * elapsed:
                    raise ServiceError(408, f"the upload arrives slower than {config.min_upload_kib_s:g} KiB/s")
                if now - upload.last > config.upload_idle_s:
                    raise ServiceError(408, f"the upload stalled: nothing arrived for {config.upload_idle_s:g} s")
                if elapsed > config.upload_timeout_s:
                    raise ServiceError(408, f"the upload did not arrive within {config.upload_timeout_s:g} s")
                pending = pending or asyncio.ensure_future(chunks.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=UPLOAD_POLL_S)
                if not done:
                    continue
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    pending = None
                    break
                pending = None
                upload.last = loop.time()
                upload.bytes = max(upload.bytes, reader.received + len(chunk))
                if sum(u.bytes for u in self._uploads) > self.config.upload_budget_mb * 2**20:
                    raise ServiceError(503, "the uploads being read hold as much memory as they may; try again "
                                            "shortly", retry_after=1)  # fmt: skip
                reader.feed(chunk)
                if not probed and len(reader.data) >= PROBE_BYTES:
                    probed = True  # a decode bomb is refused from its header, not after 2 MB
                    service.probe(bytes(reader.data[:PROBE_BYTES]))
            return reader.finish()
        finally:
            if pending is not None:
                pending.cancel()
            self._uploads.remove(upload)  # by identity: two uploads may look alike

    def _admit(self, now: float, declared: int) -> Upload:
        """A slot for a new upload (dropping the longest-stalled one when all are taken), or 503;
        ``declared`` bytes (its Content-Length) count against ``upload_budget_mb`` from the start."""
        config = self.config
        if sum(u.bytes for u in self._uploads) + declared > config.upload_budget_mb * 2**20:
            raise ServiceError(503, "the uploads being read hold as much memory as they may; try again shortly", 1)
        if len(self._uploads) >= config.max_uploads:
            stalled = [u for u in self._uploads if not u.evicted and now - u.last > EVICT_IDLE_S]
            if not stalled:
                raise ServiceError(503, "this replica is reading as many uploads as it may; try again shortly", 1)
            min(stalled, key=lambda u: u.last).evicted = True
        upload = Upload(start=now, last=now, bytes=declared)
        self._uploads.append(upload)
        return upload

    async def _parse(
        self,
        request: Request,
        model: str | None,
        targets: str | None,
        fmt: str | None,
        niter: str | None,
        job: bool = False,
    ) -> tuple[SeparationService, list[str], str, int, Any]:
        """Checked (model's service, targets, format, niter, clip) of a separation request,
        parameters before the upload; a request's place is then held (:meth:`_release` it), a
        job's is checked."""
        try:
            service = await self._service(model)
            names = service.parse_targets(targets)
            fmt = service.parse_format(fmt)
            n = service.parse_niter(niter)
            self._check_room(job)  # a full replica refuses before it reads the body
            data = await self._read_upload(request, service)
            if len(data) <= PROBE_BYTES:  # a small body is checked whole before it takes a place
                service.check_small(data)
        except ServiceError as e:
            await self._hold_back(e)
            raise
        self._reserve(job)
        try:
            clip = await asyncio.to_thread(service.decode, data)
        except ServiceError as e:
            self._release(0.0, job)
            await self._hold_back(e)
            raise
        except BaseException:
            self._release(0.0, job)
            raise
        return service, names, fmt, n, clip

    async def _hold_back(self, error: ServiceError) -> None:
        """Answer a refusal of the client's own request after ``refusal_delay_s``, holding no upload
        or separation slot meanwhile: a client that posts bad bodies back to back (a decode-bomb
        flood) then costs Ray Serve's proxy and this replica one request per delay, not a hundred a
        second. At most ``MAX_HELD_BACK`` wait at once; more are answered at once."""
        delay = self.config.refusal_delay_s
        if error.status not in REFUSED or delay <= 0 or self._held_back >= MAX_HELD_BACK:
            return
        self._held_back += 1
        try:
            await asyncio.sleep(delay)
        finally:
            self._held_back -= 1

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"X-Replica": self.replica, **(extra or {})}

    @app.post("/separate")
    async def separate(
        self,
        request: Request,
        targets: str | None = None,
        format: str | None = None,
        niter: str | None = None,
        model: str | None = None,
    ) -> Response:
        self.metrics.attempt(request.headers.get(ATTEMPT_HEADER))
        service, names, fmt, n, clip = await self._parse(request, model, targets, format, niter)
        t0 = time.perf_counter()
        try:
            if clip.seconds <= self.batch_max_seconds:
                stems = await self._separate_batch((service, clip, n))
            else:
                stems = (await asyncio.to_thread(service.separate_batch, [clip], [n]))[0]
        finally:
            self._release(time.perf_counter() - t0)
        self.metrics.separated("request", clip.seconds, time.perf_counter() - t0)
        pieces, media, name = service.package(stems, names, fmt)  # encoded as sent, off the event loop
        headers = self._headers({"Content-Disposition": f'attachment; filename="{name}"', "X-Model": service.name})
        return StreamingResponse(pieces, media_type=media, headers=headers)

    @app.post("/jobs")
    async def create_job(
        self,
        request: Request,
        targets: str | None = None,
        format: str | None = None,
        niter: str | None = None,
        model: str | None = None,
    ) -> JSONResponse:
        self._start_background()
        self.metrics.attempt(request.headers.get(ATTEMPT_HEADER))
        service, names, fmt, n, clip = await self._parse(request, model, targets, format, niter, job=True)
        # the clip waits on disk; room for it and its stems is made in the store first
        need = clip.audio.nbytes * (1 + len(names)) + 64 * 1024
        info = {"targets": names, "format": fmt, "niter": n, "seconds": clip.seconds, "replica": self.replica,
                "model": service.name}  # fmt: skip
        try:
            job_id = await asyncio.to_thread(self.jobs.create, info, need)
            await asyncio.to_thread(self.jobs.save_input, job_id, clip.audio)
        except BaseException:
            self._release(0.0, job=True)
            raise
        self._held.add(job_id)
        self._queue.put_nowait((job_id, service.name, names, fmt, n))
        return JSONResponse({"id": job_id, "status": "queued"}, status_code=202, headers=self._headers())

    async def _job_worker(self) -> None:
        """Run this replica's jobs one after another, each when no request is separating or waiting:
        requests come first, jobs take the gaps."""
        while True:
            job_id, model, names, fmt, niter = await self._queue.get()
            await self._idle.wait()
            t0 = time.perf_counter()
            try:
                await self._run_job(job_id, model, names, fmt, niter)
            finally:
                self._held.discard(job_id)
                self._release(time.perf_counter() - t0, job=True)

    async def _run_job(self, job_id: str, model: str, names: list[str], fmt: str, niter: int) -> None:
        t0 = time.time()

        async def update(**fields: Any) -> None:  # the store may be remote: off the event loop
            await asyncio.to_thread(self.jobs.update, job_id, fields)

        try:
            await update(status="running", progress=0.1)
            service = await self._service(model)
            audio = await asyncio.to_thread(self.jobs.load_input, job_id)
            clip = Clip(audio, service.rate, audio.shape[1] / service.rate)
            t1 = time.perf_counter()
            stems = (await asyncio.to_thread(service.separate_batch, [clip], [niter]))[0]
            self.metrics.separated("job", clip.seconds, time.perf_counter() - t1)
            await update(progress=0.8)
            for k, t in enumerate(names):
                data = await asyncio.to_thread(service.encode, stems[service.targets.index(t)], fmt)
                await asyncio.to_thread(self.jobs.write_stem, job_id, t, fmt, data)
                await update(progress=0.8 + 0.2 * (k + 1) / len(names))
            await update(status="done", progress=1.0, seconds_taken=time.time() - t0)
            await asyncio.to_thread(self.jobs.drop_input, job_id)
        except Exception as e:  # a failed job is reported, the replica goes on
            log.exception("job %s failed", job_id)
            try:
                await update(status="failed", error=f"the separation failed ({type(e).__name__})")
            except Exception:  # expired, or the store cannot be reached: its lease runs out instead
                log.exception("job %s: its failure could not be recorded", job_id)

    @app.websocket("/stream")
    async def stream(self, ws: WebSocket) -> None:
        """Live separation (:mod:`.streaming`): a hello, then PCM blocks in and separated blocks out."""
        await ws.accept()
        self._start_background()
        if self._streams >= self.config.max_streams:
            full = f"this replica serves {self._streams} stream(s), as many as it may (max_streams); reconnect shortly"
            await _close(ws, StreamClose(streaming.TRY_LATER, full))
            return
        self._streams += 1
        self.metrics.active_streams.set(self._streams)
        try:
            await self._stream(ws)
        except StreamClose as e:
            await _close(ws, e)
        except WebSocketDisconnect:
            pass  # the client went away: nothing to answer
        except Exception:
            log.exception("a /stream connection failed")
            failed = "the separation failed on the server (logged there); reconnect and resume"
            await _close(ws, StreamClose(streaming.INTERNAL, failed))
        finally:
            self._streams -= 1
            self.metrics.active_streams.set(self._streams)

    async def _stream(self, ws: WebSocket) -> None:
        config = self.config
        first = await _receive(ws, config.stream_idle_s)
        if first.get("text") is None:
            expected = 'the first frame must be the JSON hello, as text: {"type": "hello", ...}'
            raise StreamClose(streaming.UNSUPPORTED, expected)
        try:
            service = await self._service(streaming.hello_model(first["text"]))
        except ServiceError as e:
            raise StreamClose(streaming.POLICY, e.message) from None
        info, limits = {**service.model_info(), "replica": self.replica}, service.stream_limits()
        hello = streaming.parse_hello(first["text"], info, limits)
        streamer = await asyncio.to_thread(service.streamer)  # the onnx backend may export first
        session = StreamSession(hello, streamer, service.targets, limits)
        await ws.send_text(streaming.ready_message(hello, info, streamer.latency, limits, config.stream_idle_s))
        rate = hello.sample_rate
        while True:
            message = await _receive(ws, config.stream_idle_s)
            if message.get("bytes") is None:
                streaming.parse_end(message.get("text") or "")
                await ws.send_bytes(await self.stream_batcher.run(session, None))
                await ws.send_text(json.dumps({"type": "done", "blocks": session.seq, "samples": session.received}))
                await ws.close(streaming.NORMAL)
                return
            block = session.check(message["bytes"])
            t0 = time.perf_counter()
            answer = await self.stream_batcher.run(session, block)
            self.metrics.stream_block(block.shape[1] / rate, time.perf_counter() - t0)
            if answer is not None:
                await ws.send_bytes(answer)

    @app.api_route("/jobs/{job_id}", methods=["GET", "HEAD"])
    async def job_status(self, job_id: str) -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(self.jobs.status, job_id), headers=self._headers())

    @app.api_route("/jobs/{job_id}/{target}", methods=["GET", "HEAD"])
    async def job_stem(self, job_id: str, target: str) -> Response:
        pieces, fmt = await asyncio.to_thread(self.jobs.open_stem, job_id, target)
        headers = self._headers({"Content-Disposition": f'attachment; filename="{target}.{fmt}"'})
        return StreamingResponse(pieces, media_type=FORMATS[fmt][2], headers=headers)

    @app.api_route("/models", methods=["GET", "HEAD"])
    async def models(self) -> JSONResponse:
        models = [self.catalog.describe(name) for name in self.catalog.folders]
        for entry in models:
            entry["loaded"] = entry["name"] == self.catalog.default or entry["name"] in self._loaded
        info = {**self.default.model_info(), "models": models, "evicted": self.evicted,
                "user_config_error": self.user_config_error}  # fmt: skip
        return JSONResponse(info, headers=self._headers())

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "replica": self.replica}, headers=self._headers())

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page(self) -> Response:
        """The web page: pick or drop a file, separate it through the jobs API or stream it live."""
        return Response(PAGE["index.html"], media_type=PAGE_TYPES["index.html"], headers=self._headers(PAGE_HEADERS))

    @app.get("/page.js", include_in_schema=False)
    async def page_script(self) -> Response:
        return Response(PAGE["page.js"], media_type=PAGE_TYPES["page.js"], headers=self._headers(PAGE_HEADERS))

    @app.get("/page.css", include_in_schema=False)
    async def page_style(self) -> Response:
        return Response(PAGE["page.css"], media_type=PAGE_TYPES["page.css"], headers=self._headers(PAGE_HEADERS))

    def _docs_enabled(self, request: Request) -> None:
        if not self.config.api_docs:
            raise ServiceError(404, f"no route {request.method} {request.url.path}: the API docs are off (api_docs)")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._docs_enabled(request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        self._docs_enabled(request)
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="distunmix API")


def default_model(storage: str | Path = "runs") -> str:
    """The newest model folder under ``storage`` (absolute): a run's or experiment's ``best/``, or a
    demo's ``model/`` (``runs/demo/model``, the newest right after the demo). None there is an
    error saying which ``--model`` to pass."""
    root = Path(storage).expanduser().resolve()
    found = [*root.glob("*/best/separator.json"), *root.glob("*/model/separator.json")]
    found.sort(key=lambda p: p.stat().st_mtime)
    if found:
        return str(found[-1].parent)
    raise ConfigError(
        f"no model given and no model folder in {root} (*/best, */model): pass --model DIR (model: in "
        "serve/config.yaml), e.g. runs/demo/model after ./run.sh demo, or a folder from distunmix train or init-model"
    )


def deployment(config: ServiceConfig, **options: Any) -> serve.Application:
    """The app for ``config`` (``config.model`` None: :func:`default_model`, and the choice is
    logged); ``options`` are Serve deployment options (num_replicas, ray_actor_options, ...)."""
    if config.job_dir and is_uri(config.job_dir):  # reachable and a job store: said here, not by each replica
        open_job_files(config.job_dir)
    if config.models_root is not None:  # checked here, named in full: replicas may start in another folder
        root = str(Path(config.models_root).expanduser().resolve())
        catalog = ModelCatalog.of(config.model, root)
        config = replace(config, models_root=root, model=catalog.default)
        log.warning("serving the models %s of %s (default %s)", ", ".join(catalog.folders), root, catalog.default)
        return SeparatorDeployment.options(**options).bind(config)
    chosen = config.model is None
    if chosen:
        config = replace(config, model=default_model())
    if not is_uri(config.model):  # replicas may start in another folder
        config = replace(config, model=str(Path(config.model).expanduser().resolve()))
    # logged whether chosen or given: which folder a service answers with is never a guess
    log.warning("serving the model folder %s%s", config.model, " (no model given: the newest under runs/)" * chosen)
    return SeparatorDeployment.options(**options).bind(config)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder for ``serve run``: ``args`` are :class:`ServiceConfig`'s fields
    (``serve/config.yaml``'s ``args`` block, or ``key=value`` pairs after the import path)."""
    return deployment(ServiceConfig.from_mapping(args))


def serve_foreground(
    config: ServiceConfig,
    host: str,
    port: int,
    replicas: int = 1,
    num_gpus: float = 0.0,
    address: str | None = None,
    verbose: bool = False,
    on_ready: Callable[[str], None] = print,
) -> None:
    """``distunmix serve``: the app on ``host:port`` until Ctrl-C, on this machine's own Ray or the
    cluster at ``address``; ``on_ready`` gets the URL once it answers."""
    if replicas < 1 or num_gpus < 0:
        raise ConfigError(f"--replicas {replicas} --num-gpus {num_gpus}: expected >= 1 and >= 0")
    proxy.enable()  # a Ray started here gives its proxies the JSON errors middleware
    with ray_session(address, verbose=verbose):
        serve.start(http_options={"host": host, "port": port})
        options = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 1, "num_gpus": num_gpus}}
        serve.run(deployment(config, **options), name="distunmix", route_prefix="/")
        on_ready(f"http://{host}:{port}/")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
