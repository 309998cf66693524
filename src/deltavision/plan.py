"""Which method fits my device: measure a few training steps at two small batches, extrapolate in batch.

For each method, :func:`measure` runs in a fresh process (so its peak is its
own) a few AdamW steps on a random batch, at two small batch sizes, and
records peak training memory (weights, activations kept for backward,
gradients, optimizer state) and the median step time. Both grow linearly in
the batch, so two points predict any batch: :func:`predict` gives memory and
time at the batch asked for and the largest batch that fits a memory budget.

Step time is noisy on a shared machine: two probes can come out with the
larger batch no slower (or even faster) than the smaller one, and a straight
line through them would then predict shrinking or negative times at large
batches. More images never cost less, so a slope that is not positive is
noise: the prediction then scales the larger probe's time per image to the
batch (``large.step_seconds / large.batch * batch``), i.e. assumes no fixed
cost, which over- rather than under-states the time. With a positive slope
the line is used, floored at zero (it can only dip below zero far under the
smaller probe). Predicted times are therefore never negative.

Memory is ``torch.cuda.max_memory_allocated`` on CUDA and, on the CPU, the
growth of the process's peak resident set over its size before the model was
built, with large blocks returned to the system as soon as they are freed
(:mod:`deltavision.memory`), so the peak follows the live tensors.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import torch

MIB = 2**20


@dataclass(frozen=True)
class Probe:
    """One measurement: ``memory_bytes`` and ``step_seconds`` of training at ``batch``."""

    batch: int
    memory_bytes: float
    step_seconds: float


@dataclass(frozen=True)
class Prediction:
    method: str
    batch: int
    memory_bytes: float
    step_seconds: float
    fits: bool | None  # None: no budget given
    max_batch: int | None  # largest batch within the budget (None: no budget given)


def measure(backbone: str, method: str, image_size: int, batch: int, device: str = "cpu",
            precision: str = "fp32", steps: int = 5, backbone_options: dict | None = None) -> Probe:
    """Train ``steps`` steps (after one warm-up) at ``batch`` in this process; peak memory and median step."""
    from .memory import release_large_blocks
    from .model import create_model
    from .train.device import autocast, resolve_device
    from .train.loop import TrainConfig
    from .train.recipe import make_optimizer
    from .memory import peak_rss_bytes

    torch.manual_seed(0)
    target = resolve_device(device)
    if target.type == "cpu":
        release_large_blocks()
    before = peak_rss_bytes()
    model = create_model(backbone, method, 10, pretrained=False, backbone_options=backbone_options).to(target)
    images = torch.randn(batch, 3, image_size, image_size, device=target)
    labels = torch.randint(0, 10, (batch,), device=target)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    model.train()
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        with autocast(target, precision):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        times.append(time.perf_counter() - started)
    memory = torch.cuda.max_memory_allocated(target) if target.type == "cuda" else peak_rss_bytes() - before
    return Probe(batch, float(memory), statistics.median(times[1:]))


def measure_fresh(**kwargs: Any) -> Probe:
    """:func:`measure` in a new spawned process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, **kwargs).result()


def predict(method: str, small: Probe, large: Probe, batch: int, budget_bytes: float | None) -> Prediction:
    """Linear extrapolation through two probes to ``batch``; the largest batch within ``budget_bytes``."""
    span = large.batch - small.batch
    memory_slope = (large.memory_bytes - small.memory_bytes) / span
    time_slope = (large.step_seconds - small.step_seconds) / span
    memory = small.memory_bytes + memory_slope * (batch - small.batch)
    seconds = small.step_seconds + time_slope * (batch - small.batch)
    if time_slope <= 0:  # noisy probes: scale the larger probe's time per image (module docstring)
        seconds = large.step_seconds / large.batch * batch
    seconds = max(seconds, 0.0)
    if budget_bytes is None:
        return Prediction(method, batch, memory, seconds, None, None)
    if memory_slope <= 0:
        max_batch = batch if memory <= budget_bytes else 0
    else:
        max_batch = max(0, int(small.batch + (budget_bytes - small.memory_bytes) / memory_slope))
    return Prediction(method, batch, memory, seconds, memory <= budget_bytes, max_batch)


def plan(backbone: str, methods: list[str], image_size: int, batch: int, device: str = "cpu",
         precision: str = "fp32", budget_bytes: float | None = None, probe_batches: tuple[int, int] = (4, 8),
         backbone_options: dict | None = None, on_method=None) -> list[Prediction]:
    """Measure every method at ``probe_batches`` (each in a fresh process) and predict it at ``batch``."""
    rows = []
    for index, method in enumerate(methods, start=1):
        if on_method:
            on_method(index, len(methods), method)
        small, large = (
            measure_fresh(backbone=backbone, method=method, image_size=image_size, batch=b, device=device,
                          precision=precision, backbone_options=backbone_options)
            for b in probe_batches
        )
        rows.append(predict(method, small, large, batch, budget_bytes))
    return rows


def parse_memory(text: str) -> float:
    """``24GB``, ``24GiB``, ``512MB``, ``8G`` -> bytes (binary units)."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned and cleaned[-1] in units else (cleaned, "")
    try:
        return float(number) * units[unit]
    except ValueError:
        from .errors import DeltaVisionError

        raise DeltaVisionError(f"--memory {text!r} is not a size like 24GB or 512MB") from None
