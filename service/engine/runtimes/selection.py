"""Choosing the runtime of one model at load time: the one asked for, or (``auto``) the fastest of those installed
whose outputs agree with float32 torch, measured on the model's real input shape on the service's threads.

Agreement, on the warm-up probes (the probe photo and seeded noise images): the top-1 class is the same and every
class probability within ``PROBABILITY_TOLERANCE`` of float32 torch's; without a classification head, every
feature within ``FEATURE_TOLERANCE`` × max(1, its largest magnitude). A runtime that is not installed, fails to
export or load, or disagrees is skipped with a log line: ``auto`` never fails a start that torch would pass.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import torch
from torch import Tensor

from service.engine.runner import Forward, Outputs, checkpoint_forward
from service.engine.runtimes import (
    AUTO,
    BFLOAT16,
    EXPORT_VERSION,
    FLOAT32,
    INT8,
    ONNXRUNTIME,
    OPENVINO,
    RUNTIMES,
    TORCH,
    Runtime,
    RuntimeInfo,
    RuntimeOptions,
    RuntimeUnavailable,
    shape_key,
)
from service.engine.runtimes import eager as torch_runtime
from service.engine.runtimes import onnxruntime as ort_runtime
from service.engine.runtimes import openvino as ov_runtime
from service.engine.runtimes.cache import ArtefactCache, model_digest
from service.engine.runtimes.decisions import Decision, DecisionStore
from service.engine.served import PROBE_JPEG, PROBE_PIXELS
from service.errors import CheckpointError
from service.model.checkpoints import LoadedCheckpoint, cpu_supports_bf16
from service.model.decoding import decode_image
from service.model.pooling import LOGITS
from service.model.preprocessing import Preprocessor

log = logging.getLogger("deit_serve.runtimes")

PROBABILITY_TOLERANCE = {FLOAT32: 1e-4, BFLOAT16: 2e-2, INT8: 5e-2}
FEATURE_TOLERANCE = {FLOAT32: 1e-3, BFLOAT16: 5e-2, INT8: 1e-1}
MEASURE_BATCH = 16  # at most: the batch size timed (the service's max_batch_size when smaller)
T = TypeVar("T")


def runtime_probes(preprocessor: Preprocessor) -> list[Tensor]:
    """The warm-up probe photo, preprocessed as uploads are; none when preprocessing fails (the warm-up that
    follows reports that, named)."""
    try:
        return [preprocessor(decode_image(PROBE_JPEG, PROBE_PIXELS, preprocessor.draft_size))]
    except Exception:
        return []


def load_dtype(options: RuntimeOptions, device: torch.device) -> str:
    """The dtype to load the torch module in: float32 when another runtime is exported from it or measured
    against it, else what ``--dtype`` asks."""
    if device.type == "cpu" and options.runtime != TORCH:
        return FLOAT32
    return options.dtype


def load_quantize(options: RuntimeOptions, device: torch.device) -> str:
    """Quantize the torch module at load only when torch alone serves it: the exported runtimes quantize their own
    export, and ``auto`` quantizes a copy for torch's candidate."""
    if device.type == "cpu" and options.runtime != TORCH:
        return "none"
    return options.quantize


def precisions(runtime: str, options: RuntimeOptions) -> list[str]:
    """The precisions ``runtime`` serves for ``--dtype``/``--quantize`` on this CPU (auto: float32, and bf16 where
    the CPU has it natively); raises RuntimeUnavailable when it serves none of them."""
    if options.quantize == INT8:
        return [INT8]
    if options.dtype == "auto":
        native = BFLOAT16 if cpu_supports_bf16() else FLOAT32
        if runtime == ONNXRUNTIME:
            return [FLOAT32]
        if runtime == OPENVINO and options.runtime == AUTO and native == BFLOAT16:
            return [BFLOAT16, FLOAT32]  # measured both: bf16 is usually faster, float32 the closer
        return [native]
    if runtime == ONNXRUNTIME and options.dtype != FLOAT32:
        raise RuntimeUnavailable(f"onnxruntime serves float32 (or --quantize int8) on the CPU, not {options.dtype}")
    if runtime == OPENVINO and options.dtype == BFLOAT16 and not cpu_supports_bf16():
        raise RuntimeUnavailable("openvino serves bfloat16 only on CPUs with native bf16 (AVX512-BF16 or AMX)")
    if runtime == OPENVINO and options.dtype not in (FLOAT32, BFLOAT16):
        raise RuntimeUnavailable(f"openvino serves float32 or bfloat16 on the CPU, not {options.dtype}")
    return [options.dtype]


@dataclass
class _Candidate:
    name: str
    precision: str
    forward: Forward
    owns_weights: bool
    agreement: str = ""
    images_per_s: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision}"


def prepare_runtime(checkpoint: LoadedCheckpoint, options: RuntimeOptions, preprocessor: Preprocessor) -> Runtime:
    """The runtime serving ``checkpoint``, per ``options``; frees the torch weights when it holds its own. The
    probes it compares runtimes on are preprocessed with ``preprocessor``, only when there is a choice to make.

    Raises CheckpointError when the runtime asked for by name cannot serve (``auto`` falls back instead)."""
    if checkpoint.device.type != "cpu":
        if options.runtime in (OPENVINO, ONNXRUNTIME):
            raise CheckpointError(f"--runtime {options.runtime} runs on the CPU; on {checkpoint.device} torch serves")
        precision = torch_runtime.precision_of(checkpoint)
        reason = "auto: torch serves CUDA devices" if options.runtime == AUTO else "--runtime torch"
        return Runtime(RuntimeInfo(TORCH, precision, reason), checkpoint_forward(checkpoint), owns_weights=False)
    if options.runtime == TORCH:
        precision = torch_runtime.precision_of(checkpoint)
        return Runtime(RuntimeInfo(TORCH, precision, "--runtime torch"), checkpoint_forward(checkpoint), False)
    with ThreadPoolExecutor(
        1, "runtime-measure", initializer=torch.set_num_threads, initargs=(options.threads,)
    ) as pool:

        def on_thread(fn: Callable[[], T]) -> T:
            return pool.submit(fn).result()

        chosen = _choose(checkpoint, options, runtime_probes(preprocessor), on_thread)
    if chosen.owns_weights:
        _ = checkpoint.num_parameters  # counted before the weights go
        checkpoint.model.to(device="meta")  # the runtime holds its own copy: free torch's
        gc.collect()
    return chosen


def _choose(
    checkpoint: LoadedCheckpoint,
    options: RuntimeOptions,
    probes: Sequence[Tensor],
    on_thread: Callable[[Callable[[], Outputs]], Outputs],
) -> Runtime:
    image_shape = (checkpoint.config.num_channels, *checkpoint.preprocess.output_size)
    batch = _probe_batch(probes, image_shape)
    reference = on_thread(lambda: checkpoint_forward(checkpoint)(batch))
    comparable = all(bool(torch.isfinite(value).all()) for value in reference.values())
    if options.runtime == AUTO and not comparable:  # the non-finite guard answers for such weights
        reason = "auto: torch's float32 outputs on the probes are not finite: no runtime to compare with it"
        log.warning("runtime chosen: %s", reason, extra={"runtime": TORCH})
        precision = torch_runtime.precision_of(checkpoint)
        return Runtime(RuntimeInfo(TORCH, precision, reason), checkpoint_forward(checkpoint), owns_weights=False)
    names = list(reference)  # every output the engine uses, in serving_outputs' order
    digest = model_digest(checkpoint.model)
    cache = ArtefactCache(options.cache_dir)
    decisions = DecisionStore(options.cache_dir)
    decision_key = _decision_key(options, digest, names, image_shape) if options.runtime == AUTO else ""
    if decision_key and (kept := decisions.read(decision_key)) is not None:
        built = _build_kept(kept, checkpoint, options, names, image_shape, digest, cache)
        if built is not None:
            problem = _check(built, batch, reference, comparable, on_thread)
            if problem is None:
                reason = f"auto, as measured at {kept.measured_at} on this CPU: {kept.reason.removeprefix('auto: ')}"
                log.info("runtime chosen: %s", reason, extra={"runtime": built.label})
                return Runtime(RuntimeInfo(built.name, built.precision, reason), built.forward, built.owns_weights)
            log.warning("runtime decision not reused: %s; measuring again", problem, extra={"runtime": built.label})
        decisions.forget(decision_key)
    wanted = [options.runtime] if options.runtime != AUTO else [TORCH, OPENVINO, ONNXRUNTIME]
    candidates: list[_Candidate] = []
    for runtime in wanted:
        try:
            for precision in precisions(runtime, options):
                candidate = _build(checkpoint, runtime, precision, names, image_shape, digest, options, cache)
                candidates.append(candidate)
        except Exception as e:  # not installed, a precision it lacks, a failed export or load
            why = _why(e)
            if options.runtime != AUTO:
                raise CheckpointError(f"--runtime {runtime}: {why}") from e
            log.warning("runtime skipped: %s", why, extra={"runtime": runtime})
    agreeing: list[_Candidate] = []
    for candidate in candidates:
        problem = _check(candidate, batch, reference, comparable, on_thread)
        if problem is not None:
            if options.runtime != AUTO:
                raise CheckpointError(f"--runtime {candidate.name} {candidate.precision}: {problem}")
            log.warning("runtime skipped: %s", problem, extra={"runtime": candidate.label})
            continue
        agreeing.append(candidate)
    if options.runtime != AUTO:
        only = agreeing[0]
        reason = f"--runtime {only.name}; " + (
            f"agrees with torch float32 on the probes ({only.agreement})"
            if comparable
            else "not compared with torch: its float32 outputs on the probes are not finite"
        )
        return Runtime(RuntimeInfo(only.name, only.precision, reason), only.forward, only.owns_weights)
    if not agreeing:  # torch float32, the reference itself, is never wrong by this measure
        reason = "auto: no candidate agreed with torch float32 on the probes; it serves"
        log.warning("runtime chosen: %s", reason, extra={"runtime": TORCH})
        return Runtime(RuntimeInfo(TORCH, FLOAT32, reason), checkpoint_forward(checkpoint), owns_weights=False)
    if len(agreeing) == 1:
        only = agreeing[0]
        return Runtime(RuntimeInfo(only.name, only.precision, f"auto: only {only.label} available"), only.forward,
                       only.owns_weights)  # fmt: skip
    timed = _probe_batch(probes, image_shape, min(MEASURE_BATCH, options.max_batch_size))
    speeds = measure(
        [candidate.forward for candidate in agreeing],
        len(timed),
        options.measure_s,
        lambda f: on_thread(lambda: f(timed)),
    )
    for candidate, speed in zip(agreeing, speeds, strict=True):
        candidate.images_per_s = speed
    agreeing.sort(key=lambda c: c.images_per_s, reverse=True)
    best = agreeing[0]
    others = ", ".join(f"{c.label} {c.images_per_s:.1f}" for c in agreeing[1:])
    reason = (
        f"auto: fastest at batch {len(timed)} on {options.threads} threads: {best.label} {best.images_per_s:.1f} "
        f"img/s (then {others}); agrees with torch float32 ({best.agreement})"
    )
    log.info("runtime chosen: %s", reason, extra={"runtime": best.label})
    if decision_key:
        measured_at = datetime.now(UTC).isoformat(timespec="seconds")
        decisions.write(decision_key, Decision(best.name, best.precision, reason, measured_at))
    return Runtime(RuntimeInfo(best.name, best.precision, reason), best.forward, best.owns_weights)


def _decision_key(options: RuntimeOptions, digest: str, names: list[str], image_shape: tuple[int, int, int]) -> str:
    """What a measurement's outcome depends on, besides the CPU (``DecisionStore.key`` adds it): the weights, the
    options, the measured shape, and the version of every candidate (absent ones too: installing one is a new
    choice)."""
    versions = [torch.__version__, EXPORT_VERSION]
    for name, version in ((OPENVINO, ov_runtime.version), (ONNXRUNTIME, ort_runtime.version)):
        try:
            versions.append(f"{name} {version()}")
        except RuntimeUnavailable:
            versions.append(f"{name} absent")
    if options.quantize == INT8:
        try:
            versions.append(f"nncf {ov_runtime.nncf_version()}")
        except RuntimeUnavailable:
            versions.append("nncf absent")
    batch = str(min(MEASURE_BATCH, options.max_batch_size))
    return DecisionStore.key(digest, options.dtype, options.quantize, str(options.threads), str(options.streams),
                             batch, shape_key(image_shape), ",".join(names), *versions)  # fmt: skip


def _build_kept(
    kept: Decision,
    checkpoint: LoadedCheckpoint,
    options: RuntimeOptions,
    names: list[str],
    image_shape: tuple[int, int, int],
    digest: str,
    cache: ArtefactCache,
) -> _Candidate | None:
    """The runtime a kept decision names, built; None (logged) when it no longer builds at that precision."""
    try:
        if kept.runtime not in RUNTIMES or kept.precision not in precisions(kept.runtime, options):
            raise RuntimeUnavailable(f"{kept.runtime} {kept.precision} is not a candidate here")
        return _build(checkpoint, kept.runtime, kept.precision, names, image_shape, digest, options, cache)
    except Exception as e:
        log.warning("runtime decision not reused: %s; measuring again", _why(e), extra={"runtime": kept.runtime})
        return None


def _check(
    candidate: _Candidate,
    batch: list[Tensor],
    reference: Outputs,
    comparable: bool,
    on_thread: Callable[[Callable[[], Outputs]], Outputs],
) -> str | None:
    """Run the probes through ``candidate``: None when its outputs agree with float32 torch's (or torch's are not
    finite, so not compared), its ``agreement`` then saying how closely; else what went wrong."""
    try:
        outputs = on_thread(lambda: candidate.forward(batch))
        problem = _disagreement(outputs, reference, candidate.precision) if comparable else None
    except Exception as e:  # a runtime that cannot run the probes is skipped, never a failed start
        return f"the probes failed: {type(e).__name__}: {e}"
    if problem is None:
        candidate.agreement = _agreement(outputs, reference) if comparable else "not compared: not finite"
    return problem


def _why(error: Exception) -> str:
    """Why a runtime cannot serve: its own message when it says so, else the error's type and message."""
    return str(error) if isinstance(error, RuntimeUnavailable) else f"{type(error).__name__}: {error}"


def _build(
    checkpoint: LoadedCheckpoint,
    runtime: str,
    precision: str,
    names: list[str],
    image_shape: tuple[int, int, int],
    digest: str,
    options: RuntimeOptions,
    cache: ArtefactCache,
) -> _Candidate:
    if runtime == TORCH:
        return _Candidate(TORCH, precision, torch_runtime.build(checkpoint, precision), owns_weights=False)
    builder = ov_runtime.build if runtime == OPENVINO else ort_runtime.build
    forward = builder(
        checkpoint.model,
        names,
        image_shape,
        digest=digest,
        precision=precision,
        threads=options.threads,
        streams=options.streams,
        cache=cache,
    )
    return _Candidate(runtime, precision, forward, owns_weights=True)


def _probe_batch(probes: Sequence[Tensor], image_shape: tuple[int, int, int], size: int = 0) -> list[Tensor]:
    """The probes and seeded noise images (4 at least), repeated up to ``size``."""
    generator = torch.Generator().manual_seed(0)
    images = list(probes) + [torch.randn(image_shape, generator=generator) for _ in range(max(0, 4 - len(probes)))]
    if size:
        images = [images[i % len(images)] for i in range(size)]
    return images


def _disagreement(outputs: Outputs, reference: Outputs, precision: str) -> str | None:
    """None when ``outputs`` agree with float32 torch's (module docstring), else how they differ."""
    if set(outputs) != set(reference):
        return f"outputs {sorted(outputs)} differ from torch's {sorted(reference)}"
    for name, want in reference.items():
        got = outputs[name]
        if got.shape != want.shape:
            return f"output {name} has shape {tuple(got.shape)}, not {tuple(want.shape)}"
        if not bool(torch.isfinite(got).all()):
            return f"output {name} holds NaN or infinite values"
    if LOGITS in reference:
        got_p, want_p = outputs[LOGITS].softmax(-1), reference[LOGITS].softmax(-1)
        if not torch.equal(got_p.argmax(-1), want_p.argmax(-1)):
            return "its top-1 class differs from torch float32's"
        delta = float((got_p - want_p).abs().max())
        if delta > PROBABILITY_TOLERANCE[precision]:
            return f"max |Δp| {delta:.2e} above the {precision} tolerance {PROBABILITY_TOLERANCE[precision]:.0e}"
        return None
    for name, want in reference.items():
        delta = float((outputs[name] - want).abs().max())
        bound = FEATURE_TOLERANCE[precision] * max(1.0, float(want.abs().max()))
        if delta > bound:
            return f"output {name}: max |Δ| {delta:.2e} above {bound:.2e}"
    return None


def _agreement(outputs: Outputs, reference: Outputs) -> str:
    if LOGITS in reference:
        delta = float((outputs[LOGITS].softmax(-1) - reference[LOGITS].softmax(-1)).abs().max())
        return f"top-1 equal, max |Δp| {delta:.1e}"
    delta = max(float((outputs[n] - reference[n]).abs().max()) for n in reference)
    return f"max |Δ features| {delta:.1e}"


def measure(
    forwards: Sequence[T],
    batch_size: int,
    budget_s: float,
    run: Callable[[T], object],
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Images per second of each of ``forwards`` (run through ``run``), in rounds: one untimed pass each first,
    then each takes one timed pass a round, in an order that rotates from round to round, until ``budget_s`` per
    forward has passed (one round at least). Each one's figure is the median of its passes. Interleaved so that
    whatever else slows the machine down for a while (a neighbour, the clock) falls on every candidate alike, not
    on whichever was timed at that moment."""
    for forward in forwards:
        run(forward)
    times: list[list[float]] = [[] for _ in forwards]
    started = clock()
    rounds = 0
    while rounds == 0 or clock() - started < budget_s * len(forwards):
        for k in range(len(forwards)):
            i = (rounds + k) % len(forwards)
            t = clock()
            run(forwards[i])
            times[i].append(clock() - t)
        rounds += 1
    return [batch_size / max(statistics.median(passes), 1e-9) for passes in times]
