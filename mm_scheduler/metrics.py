"""Prometheus metrics, registered once per process on the default registry, on first use.

Every series carries a ``coalescer`` label (the config's ``name``) so several coalescers (one per
tower) in one process stay apart, and a host such as SGLang's ``/metrics`` endpoint exposes them
without extra wiring.

prometheus_client is imported only when a series is first used (``metrics.UNITS`` ...), not when
``mm_scheduler`` is imported: in multiprocess mode it must first be imported after the host has set
``PROMETHEUS_MULTIPROC_DIR``, and SGLang sets it late, after plugins load.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

_LABEL = ("coalescer",)
_SIZE_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


_FIRST_USE = threading.Lock()
_registered: SimpleNamespace | None = None


def _series() -> SimpleNamespace:
    """The series, registered by the first caller; the lock keeps two threads' first calls from both registering."""
    global _registered
    if _registered is None:
        with _FIRST_USE:
            if _registered is None:
                _registered = _register()
    return _registered


def _register() -> SimpleNamespace:
    from prometheus_client import Counter, Gauge, Histogram

    return SimpleNamespace(
        UNITS=Counter("mm_coalescer_units", "Units (images, video frames) submitted", _LABEL),
        REQUESTS=Counter("mm_coalescer_requests", "encode() calls by outcome", (*_LABEL, "outcome")),
        FORWARDS=Counter("mm_coalescer_forwards", "Tower forwards run (bisection retries included)", _LABEL),
        PATCHES_PER_FORWARD=Histogram("mm_coalescer_patches_per_forward", "Patches in one forward", _LABEL,
                                      buckets=_SIZE_BUCKETS),
        UNITS_PER_FORWARD=Histogram("mm_coalescer_units_per_forward", "Units in one forward", _LABEL,
                                    buckets=_COUNT_BUCKETS),
        BUDGET_FILL=Histogram("mm_coalescer_budget_fill_ratio", "Patches of a batch / its bucket's budget", _LABEL,
                              buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)),
        QUEUE_WAIT=Histogram("mm_coalescer_queue_wait_seconds",
                             "Time from submit to dispatch, per batch's oldest unit", _LABEL,
                             buckets=_SECONDS_BUCKETS),
        BATCH_SECONDS=Histogram("mm_coalescer_batch_seconds", "Dispatch to results ready, per batch", _LABEL,
                                buckets=_SECONDS_BUCKETS),
        BATCH_GPU_SECONDS=Histogram("mm_coalescer_batch_gpu_seconds",
                                    "Encoder-stream time of a batch (CUDA events around its forwards), per batch",
                                    _LABEL, buckets=_SECONDS_BUCKETS),
        BATCH_LAUNCH_SECONDS=Histogram("mm_coalescer_batch_launch_seconds",
                                       "Host time in the tower's forward calls (kernel launches), per batch", _LABEL,
                                       buckets=_SECONDS_BUCKETS),
        DEDUP_HITS=Counter("mm_coalescer_dedup_hits", "Units served by identical work already queued or running",
                           _LABEL),
        ERRORS=Counter("mm_coalescer_errors", "Failed units and rejected requests by kind", (*_LABEL, "kind")),
        OOM_BACKOFFS=Counter("mm_coalescer_oom_backoffs", "Out-of-memory forwards that shrank a bucket's budget",
                             _LABEL),
        QUEUE_PATCHES=Gauge("mm_coalescer_queue_patches", "Patches waiting in the queue", _LABEL),
        TOWER_HEALTHY=Gauge("mm_coalescer_tower_healthy",
                            "1 while the tower serves; 0 after a forward hung until a health probe succeeds", _LABEL),
        FORWARD_TIMEOUTS=Counter("mm_coalescer_forward_timeouts",
                                 "Forwards abandoned past forward_timeout_s (their thread is left behind)", _LABEL),
        HEALTH_PROBES=Counter("mm_coalescer_health_probes", "Probe forwards run while unhealthy, by outcome",
                              (*_LABEL, "outcome")),
        FORWARD_DEADLINE=Gauge("mm_coalescer_forward_deadline_seconds",
                               "The deadline one forward currently gets (0: none)", _LABEL),
    )


def __getattr__(name: str) -> Any:
    try:
        return getattr(_series(), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
