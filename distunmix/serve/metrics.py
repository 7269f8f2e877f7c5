"""The Serve app's own metrics, through Ray Serve's metrics API (Ray's Prometheus endpoint).

Every series carries Ray Serve's ``deployment``, ``replica`` and ``application`` tags; Ray adds
the ``ray_`` prefix on export. Names and meanings are listed in the README ("Metrics").
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from .client import ATTEMPT_HEADER

RTF_BOUNDARIES = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]  # audio seconds per wall second


class Metrics:
    """One replica's metrics."""

    def __init__(self) -> None:
        self.audio_seconds = Counter(
            "distunmix_audio_seconds", "seconds of audio separated", tag_keys=("kind",)
        )  # kind: request, job, stream
        self.realtime_factor = Histogram(
            "distunmix_realtime_factor", "audio seconds per wall second, per request or job",
            boundaries=RTF_BOUNDARIES, tag_keys=("kind",),
        )  # fmt: skip
        self.active_streams = Gauge("distunmix_active_streams", "live /stream connections on this replica")
        self.stream_blocks = Counter("distunmix_stream_blocks", "/stream blocks separated")
        self.late_blocks = Counter(
            "distunmix_late_stream_blocks", "/stream blocks whose separation took longer than their duration"
        )
        self.job_queue = Gauge("distunmix_job_queue_length", "jobs this replica holds, queued or running")
        self.retries = Counter(
            "distunmix_retries_seen", f"requests a client sent again (its {ATTEMPT_HEADER} header above 1)"
        )

    def separated(self, kind: str, audio_seconds: float, wall_seconds: float) -> None:
        """One request's or job's separation."""
        self.audio_seconds.inc(audio_seconds, tags={"kind": kind})
        if wall_seconds > 0:
            self.realtime_factor.observe(audio_seconds / wall_seconds, tags={"kind": kind})

    def stream_block(self, audio_seconds: float, wall_seconds: float) -> None:
        """One /stream block: late when it took longer than the audio it holds."""
        self.audio_seconds.inc(audio_seconds, tags={"kind": "stream"})
        self.stream_blocks.inc()
        if wall_seconds > audio_seconds:
            self.late_blocks.inc()

    def attempt(self, header: str | None) -> None:
        """Count a request that says it is a retry."""
        if header and header.isdigit() and int(header) > 1:
            self.retries.inc()
