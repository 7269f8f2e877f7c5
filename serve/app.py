"""Ray Serve deployment with a FastAPI ingress around :class:`distunmix.serving.SeparationService`.

Routes: ``POST /separate`` (raw body or multipart field ``file``; query ``targets``, ``format``,
``niter``) returns one stem or a ZIP; ``POST /jobs`` starts a long job, ``GET /jobs/{id}`` reports
it and ``GET /jobs/{id}/{target}`` downloads a stem; ``GET /models`` and ``GET /healthz``. Short
clips arriving together are separated as one batch (``@serve.batch``).
"""

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from distunmix.serving import FORMATS, JobStore, SeparationService, ServiceConfig, ServiceError, multipart_file

app = FastAPI(title="distunmix", description="Open-Unmix source separation")


@app.exception_handler(ServiceError)
async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"error": exc.message})


@serve.deployment(name="Separator", max_ongoing_requests=8, max_queued_requests=32, health_check_period_s=10)
@serve.ingress(app)
class SeparatorDeployment:
    """One replica: a loaded model, a job store, and a batcher for short clips."""

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        max_upload_mb: float = 100.0,
        max_seconds: float = 600.0,
        batch_size: int = 8,
        batch_wait_s: float = 0.05,
        batch_max_seconds: float = 30.0,
        job_dir: str | None = None,
        job_ttl_s: float = 3600.0,
    ) -> None:
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.service = SeparationService(
            ServiceConfig(
                model=model,
                device=device,
                max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                max_seconds=max_seconds,
                job_ttl_seconds=job_ttl_s,
            )
        )
        # one folder for every replica on this node, so any replica can answer for any job
        self.jobs = JobStore(job_dir or Path(tempfile.gettempdir()) / "distunmix-jobs", job_ttl_s)
        self.batch_max_seconds = batch_max_seconds
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._separate_batch.set_max_batch_size(batch_size)
        self._separate_batch.set_batch_wait_timeout_s(batch_wait_s)

    def check_health(self) -> None:
        self.service.healthy()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _separate_batch(self, items: list[tuple[Any, int]]) -> list[Any]:
        clips, niters = [c for c, _ in items], [n for _, n in items]
        return await asyncio.to_thread(self.service.separate_batch, clips, niters)

    async def _read_upload(self, request: Request) -> bytes:
        """The audio bytes of a raw or multipart body, refusing oversized ones before reading them."""
        limit = self.service.config.max_upload_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit + 64 * 1024:
            raise ServiceError(413, f"upload of {length} bytes exceeds the limit of {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit + 64 * 1024:
                raise ServiceError(413, f"upload exceeds the limit of {limit} bytes")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            return multipart_file(bytes(body), ctype)
        return bytes(body)

    async def _parse(self, request: Request, targets: str | None, fmt: str | None, niter: str | None):
        """Checked (targets, format, niter, clip) of a separation request; parameters before the upload."""
        names = self.service.parse_targets(targets)
        fmt = self.service.parse_format(fmt)
        n = self.service.parse_niter(niter)
        return names, fmt, n, self.service.decode(await self._read_upload(request))

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"X-Replica": self.replica, **(extra or {})}

    @app.post("/separate")
    async def separate(
        self, request: Request, targets: str | None = None, format: str | None = None, niter: str | None = None
    ) -> Response:
        names, fmt, n, clip = await self._parse(request, targets, format, niter)
        if clip.seconds <= self.batch_max_seconds:
            stems = await self._separate_batch((clip, n))
        else:
            stems = (await asyncio.to_thread(self.service.separate_batch, [clip], [n]))[0]
        body, media, name = await asyncio.to_thread(self.service.package, stems, names, fmt)
        headers = self._headers({"Content-Disposition": f'attachment; filename="{name}"'})
        return Response(body, media_type=media, headers=headers)

    @app.post("/jobs")
    async def create_job(
        self, request: Request, targets: str | None = None, format: str | None = None, niter: str | None = None
    ) -> JSONResponse:
        names, fmt, n, clip = await self._parse(request, targets, format, niter)
        self.jobs.expire()
        job_id = self.jobs.create({"targets": names, "format": fmt, "seconds": clip.seconds, "replica": self.replica})
        asyncio.get_running_loop().create_task(self._run_job(job_id, clip, names, fmt, n))
        return JSONResponse({"id": job_id, "status": "queued"}, status_code=202, headers=self._headers())

    async def _run_job(self, job_id: str, clip, names: list[str], fmt: str, niter: int) -> None:
        t0 = time.time()
        try:
            self.jobs.update(job_id, {"status": "running", "progress": 0.1})
            stems = (await asyncio.to_thread(self.service.separate_batch, [clip], [niter]))[0]
            self.jobs.update(job_id, {"progress": 0.8})
            for k, t in enumerate(names):
                data = await asyncio.to_thread(self.service.encode, stems[self.service.targets.index(t)], fmt)
                self.jobs.write_stem(job_id, t, fmt, data)
                self.jobs.update(job_id, {"progress": 0.8 + 0.2 * (k + 1) / len(names)})
            self.jobs.update(job_id, {"status": "done", "progress": 1.0, "seconds_taken": time.time() - t0})
        except Exception as e:  # a failed job is reported, the replica goes on
            self.jobs.update(job_id, {"status": "failed", "error": f"{type(e).__name__}: {e}"})

    @app.get("/jobs/{job_id}")
    async def job_status(self, job_id: str) -> JSONResponse:
        return JSONResponse(self.jobs.status(job_id), headers=self._headers())

    @app.get("/jobs/{job_id}/{target}")
    async def job_stem(self, job_id: str, target: str) -> Response:
        data, fmt = self.jobs.stem(job_id, target)
        headers = self._headers({"Content-Disposition": f'attachment; filename="{target}.{fmt}"'})
        return Response(data, media_type=FORMATS[fmt][2], headers=headers)

    @app.get("/models")
    async def models(self) -> JSONResponse:
        return JSONResponse(self.service.model_info(), headers=self._headers())

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "replica": self.replica}, headers=self._headers())


def default_model(storage: str = "runs") -> str:
    """The newest tuning experiment's best/ under ``storage``, else a generated default model."""
    from pathlib import Path

    found = sorted(Path(storage).glob("*/best/separator.json"), key=lambda p: p.stat().st_mtime)
    if found:
        return str(found[-1].parent)
    folder = Path(storage) / "serve-default-model"
    if not (folder / "separator.json").is_file():
        import torch

        from distunmix.checkpoint import STANDARD_TARGETS, save_model_dir
        from distunmix.model import ModelConfig, OpenUnmix

        torch.manual_seed(0)
        config = ModelConfig.from_bandwidth(hidden_size=128)
        save_model_dir(folder, {t: OpenUnmix.from_config(config) for t in STANDARD_TARGETS}, bandwidth=16000.0)
    return str(folder)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run serve/config.yaml``: ``args`` are the deployment's
    keyword arguments; ``model`` defaults to :func:`default_model`."""
    args = dict(args or {})
    if not args.get("model"):
        args["model"] = default_model(args.pop("storage", "runs"))
    args.pop("storage", None)
    return SeparatorDeployment.bind(**args)
