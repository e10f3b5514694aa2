"""Triton's statistics extension: per model version, cumulative counts and nanoseconds of requests, queueing,
decoding, forward passes and their outputs, per batch size, read from the same counters ``/metrics`` exposes.

Served over REST (``GET /v2/models/stats``, ``/v2/models/{m}[/versions/{v}]/stats``) and gRPC (ModelStatistics).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fastapi import APIRouter

from service.api.admission import AppState, Authorized, State
from service.api.schemas import PlainErrorBody
from service.api.v2 import resolve_model
from service.metrics import Metrics

router = APIRouter(tags=["Open Inference Protocol"])
_SAMPLES = (
    "deit_images_total", "deit_batch_executions_total", "deit_batch_seconds_total",
    "deit_last_inference_timestamp_seconds", "deit_inference_request_duration_seconds_count",
    "deit_inference_request_duration_seconds_sum",
    "deit_queue_wait_seconds_count", "deit_queue_wait_seconds_sum", "deit_preprocess_duration_seconds_count",
    "deit_preprocess_duration_seconds_sum",
)  # fmt: skip
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": PlainErrorBody} for code in (401, 404, 422)}

Samples = dict[str, list[tuple[dict[str, str], float]]]


def _samples(metrics: Metrics) -> Samples:
    """The samples the statistics read, by name, from one pass over the registry."""
    found: Samples = defaultdict(list)
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name in _SAMPLES:
                found[sample.name].append((sample.labels, sample.value))
    return found


def _sum(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v for sample_labels, v in samples.get(name, ()) if all(sample_labels.get(k) == x for k, x in labels.items())
    )


def _duration(count: float, seconds: float) -> dict[str, int]:
    return {"count": int(count), "ns": int(seconds * 1e9)}


def _requests(samples: Samples, at: dict[str, str]) -> dict[bool, tuple[float, float]]:
    """Count and seconds of the version's inference requests, every protocol, by success (status below 400)."""
    totals = {True: [0.0, 0.0], False: [0.0, 0.0]}
    for field, index in (("count", 0), ("sum", 1)):
        for labels, value in samples.get(f"deit_inference_request_duration_seconds_{field}", ()):
            if labels.items() >= at.items():
                totals[int(labels["status"]) < 400][index] += value
    return {ok: (count, seconds) for ok, (count, seconds) in totals.items()}


def version_statistics(samples: Samples, model: str, version: str) -> dict[str, Any]:
    """One model version's statistics, in the extension's JSON shape (the gRPC message's fields, same names)."""
    at = {"model": model, "version": version}
    executions = _sum(samples, "deit_batch_executions_total", **at)
    sizes = sorted(
        {
            int(labels["batch_size"])
            for labels, _ in samples.get("deit_batch_executions_total", ())
            if labels.items() >= at.items()
        }
    )
    batch_stats = []
    for size in sizes:
        by_size = {**at, "batch_size": str(size)}
        count = _sum(samples, "deit_batch_executions_total", **by_size)
        batch_stats.append({
            "batch_size": size,
            "compute_input": _duration(0, 0),  # stacking the batch is timed with the forward pass
            "compute_infer": _duration(count, _sum(samples, "deit_batch_seconds_total", **by_size, phase="infer")),
            "compute_output": _duration(count, _sum(samples, "deit_batch_seconds_total", **by_size, phase="output")),
        })  # fmt: skip
    requests = _requests(samples, at)
    return {
        "name": model,
        "version": version,
        "last_inference": int(_sum(samples, "deit_last_inference_timestamp_seconds", **at) * 1000),
        "inference_count": int(_sum(samples, "deit_images_total", **at)),
        "execution_count": int(executions),
        "inference_stats": {
            "success": _duration(*requests[True]),
            "fail": _duration(*requests[False]),
            "queue": _duration(
                _sum(samples, "deit_queue_wait_seconds_count", **at), _sum(samples, "deit_queue_wait_seconds_sum", **at)
            ),
            "compute_input": _duration(
                _sum(samples, "deit_preprocess_duration_seconds_count", **at),
                _sum(samples, "deit_preprocess_duration_seconds_sum", **at),
            ),
            "compute_infer": _duration(executions, _sum(samples, "deit_batch_seconds_total", **at, phase="infer")),
            "compute_output": _duration(executions, _sum(samples, "deit_batch_seconds_total", **at, phase="output")),
        },
        "batch_stats": batch_stats,
    }


def model_statistics(state: AppState, name: str | None, version: str | None) -> dict[str, Any]:
    """``{"model_stats": [...]}`` for every loaded version of every model (no name), of one model, or of one of its
    versions; 404 for a model or version not loaded (as every V2 route resolves them)."""
    if name:
        served = resolve_model(state, name, version or None)
        targets = [(served.name, str(v)) for v in sorted(state.store.loaded(served.name))]
        if version:
            targets = [(served.name, str(served.version))]
    else:
        targets = [(n, str(v)) for n in sorted(state.store.versions) for v in sorted(state.store.versions[n])]
    samples = _samples(state.metrics)
    return {"model_stats": [version_statistics(samples, n, v) for n, v in targets]}


_ROUTE: dict[str, Any] = {"dependencies": [Authorized], "responses": _ERRORS}


@router.get("/v2/models/stats", summary="Statistics of every loaded model version", **_ROUTE)
async def all_statistics(state: State) -> dict[str, Any]:
    return model_statistics(state, None, None)


@router.get("/v2/models/{model_name}/stats", summary="Statistics of a model's loaded versions", **_ROUTE)
async def statistics(state: State, model_name: str) -> dict[str, Any]:
    return model_statistics(state, model_name, None)


@router.get("/v2/models/{model_name}/versions/{model_version}/stats", summary="Statistics of one version", **_ROUTE)
async def version_stats(state: State, model_name: str, model_version: str) -> dict[str, Any]:
    return model_statistics(state, model_name, model_version)
