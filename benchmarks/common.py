"""Measurement machinery shared by the benchmark scripts (foundation.py, e3va.py, multitask.py, gpu.py,
segmentation.py).

* **Fresh processes.** A script re-invokes itself with ``--worker JSON`` for
  every configuration whose memory it measures (:func:`run_in_fresh_process`,
  :func:`serve_worker`), so no allocator state, cache or peak carries over
  from another configuration. The worker prints one ``RESULT {json}`` line.
* **Peak training memory** (:func:`peak_growth`): with the model and a fixed
  random batch built, read the process's peak RSS (VmHWM), create the
  optimizer, run a few steps and report how far the peak grew: activations
  kept for backward, gradients, AdamW state and framework buffers; the
  weights are part of the baseline. Memory workers run with
  :data:`EXACT_ALLOCATION_ENV`, so freed tensors leave the RSS at once and
  the peak counts live memory, not the allocator's retained heap.
* **Held memory** (:func:`held_rss_bytes`): the current RSS after garbage
  collection and ``malloc_trim``, for "what does this object keep alive".
* **Interleaved timing** (:func:`interleaved_medians`): every round calls each
  candidate once, in an order rotated by one per round; warm-up rounds, then
  the median of the timed rounds. A change of load from other processes hits
  every candidate alike instead of skewing whichever ran at the time.
* **Device** (:func:`configure`, ``--device``, default cpu; ``--precision``,
  default fp32): models and batches are built on it and training steps run
  under its autocast. Only the measurement functions here branch on the
  device: on CUDA, memory is ``torch.cuda.max_memory_allocated`` (and
  ``max_memory_reserved``) after ``reset_peak_memory_stats``, read relative
  to the memory allocated before the step, and every timed call ends with
  ``torch.cuda.synchronize``. On the CPU nothing changes: peak RSS and wall
  time as described above. Worker processes get the parent's device and
  precision on their command line.

Every process uses ``torch.set_num_threads(2)`` and seed 0. The embedded
default backbone (tf_efficientnet_lite0) loads its real shipped weights; the
others use random init (the measured costs do not depend on weight values).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import deltavision  # noqa: E402
from deltavision.backbones import create_backbone  # noqa: E402
from deltavision.errors import DeltaVisionError  # noqa: E402
from deltavision.train.device import autocast, check_precision, resolve_device  # noqa: E402
from timm.optim import param_groups_weight_decay  # noqa: E402
from deltavision.memory import peak_rss_bytes  # noqa: E402

EMBEDDED = "tf_efficientnet_lite0"  # the only backbone with offline pretrained weights
NUM_CLASSES = 10
THREADS = 2  # torch intra-op threads of every process (--threads)
SEED = 0
WEIGHT_DECAY = 0.05
LEARNING_RATE = 1e-3
MIB = 2**20
RESULT_TAG = "RESULT "
RESULTS_DIR = Path(__file__).resolve().parent / "results"

Call = Callable[[], object]

# The device and precision of this process (set by :func:`configure` from --device / --precision).
DEVICE = torch.device("cpu")
PRECISION = "fp32"


def configure(device: str = "cpu", precision: str = "fp32") -> None:
    """Set the device and precision every builder, step and measurement here uses.

    Refuses what this machine cannot run (no CUDA GPU; fp16 on the CPU)."""
    global DEVICE, PRECISION
    target = resolve_device(device)
    check_precision(target, precision)
    DEVICE, PRECISION = target, precision


def on_cuda() -> bool:
    return DEVICE.type == "cuda"


def synchronize() -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if on_cuda():
        torch.cuda.synchronize(DEVICE)


# ---------------------------------------------------------------- models and batches


def setup_torch() -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)


def size_options(backbone: str, image_size: int) -> dict:
    """``img_size`` for fixed-input-size models (ViT, Swin) run off their native size."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is not None and cfg.fixed_input_size and cfg.input_size[-1] != image_size:
        return {"img_size": image_size}
    return {}


def build_model(backbone: str, method: str, image_size: int, options: dict | None = None,
                architecture: dict | None = None) -> nn.Module:
    """``deltavision.create_model`` with a 10-class head; real weights only for the embedded backbone.

    ``architecture``: extra timm constructor options (e.g. a smaller depth for smoke tests)."""
    return deltavision.create_model(
        backbone, method, NUM_CLASSES, pretrained=backbone == EMBEDDED,
        backbone_options={**size_options(backbone, image_size), **(architecture or {})} or None, **(options or {}),
    ).to(DEVICE)


def build_plain(backbone: str, image_size: int, architecture: dict | None = None) -> nn.Module:
    """The untouched timm model with a 10-class head (same weights policy as :func:`build_model`)."""
    options = {**size_options(backbone, image_size), **(architecture or {})}
    return create_backbone(backbone, NUM_CLASSES, pretrained=backbone == EMBEDDED, options=options).to(DEVICE)


def fixed_batch(batch: int, image_size: int, dense: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random images and labels: one class per image, or with ``dense`` one per pixel
    (``(batch, image_size, image_size)`` masks for segmentation models; the same cross-entropy step trains both)."""
    generator = torch.Generator().manual_seed(SEED)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    shape = (batch, image_size, image_size) if dense else (batch,)
    labels = torch.randint(0, NUM_CLASSES, shape, generator=generator)
    return images.to(DEVICE), labels.to(DEVICE)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the distinct parameter and buffer tensors of ``module``."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---------------------------------------------------------------- steps


def training_step(model, optimizer, images, labels) -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast(DEVICE, PRECISION):
        logits = model(images)
    torch.nn.functional.cross_entropy(logits.float(), labels).backward()
    optimizer.step()


def training_call(model: nn.Module, images, labels) -> Call:
    """One training step (forward, cross-entropy, backward, AdamW over timm's ``param_groups_weight_decay``) as a call."""
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, WEIGHT_DECAY), lr=LEARNING_RATE)
    deltavision.set_train_mode(model)
    return functools.partial(training_step, model, optimizer, images, labels)


def no_grad_forward(model, images) -> None:
    with torch.no_grad(), autocast(DEVICE, PRECISION):
        model(images)


def no_grad_call(model: nn.Module, images, labels) -> Call:
    """The floor of any training step: the frozen model's forward under ``torch.no_grad``, in
    training mode as :func:`deltavision.set_train_mode` sets it (frozen BatchNorms in eval mode);
    no loss, no backward, no optimizer."""
    deltavision.set_train_mode(model.requires_grad_(False))
    return functools.partial(no_grad_forward, model, images)


def peak_growth(model: nn.Module, images, labels, make_call=training_call, steps: int = 3) -> dict:
    """Growth of the peak memory over ``steps`` calls, above the level once ``model`` and the batch exist.

    CPU: the process's peak RSS. CUDA: ``max_memory_allocated`` after
    ``reset_peak_memory_stats``, minus what was allocated before (weights and
    batch); ``peak_reserved_growth_mib`` adds the caching allocator's
    reserve. Step 2 is the first with gradients and AdamW state alive
    together, so two or more steps reach the training peak."""
    gc.collect()
    if on_cuda():
        synchronize()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        baseline = torch.cuda.memory_allocated(DEVICE)
        baseline_reserved = torch.cuda.memory_reserved(DEVICE)
    else:
        baseline = peak_rss_bytes()
    call = make_call(model, images, labels)
    for _ in range(steps):
        call()
    if not on_cuda():
        return {"baseline_rss_mib": baseline / MIB, "peak_growth_mib": (peak_rss_bytes() - baseline) / MIB}
    synchronize()
    return {
        "baseline_allocated_mib": baseline / MIB,
        "peak_growth_mib": (torch.cuda.max_memory_allocated(DEVICE) - baseline) / MIB,
        "peak_reserved_growth_mib": (torch.cuda.max_memory_reserved(DEVICE) - baseline_reserved) / MIB,
    }


def held_rss_bytes() -> int:
    """Current RSS after ``gc.collect`` and glibc's ``malloc_trim(0)`` (freed heap pages go back to the OS);
    on CUDA the bytes allocated on the device."""
    gc.collect()
    if on_cuda():
        synchronize()
        return torch.cuda.memory_allocated(DEVICE)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def interleaved_medians(calls: dict[str, Call], warmup: int, runs: int) -> dict[str, float]:
    """Median wall time (s) of each call over ``runs`` rounds after ``warmup`` rounds.

    Every round runs each call once, in an order rotated by one per round, so a
    change of machine load during the measurement hits all of them alike. On
    CUDA the device is synchronized before the clock starts and before it stops."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rnd in range(warmup + runs):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize()
            started = time.perf_counter()
            calls[name]()
            synchronize()
            if rnd >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def prepare_all(prepare: Callable[[str], Call], names) -> tuple[dict[str, Call], dict[str, str]]:
    """``prepare(name)`` for every name; those that do not apply (DeltaVisionError) go to ``skipped``."""
    calls, skipped = {}, {}
    for name in names:
        try:
            calls[name] = prepare(name)
        except DeltaVisionError as err:
            skipped[name] = first_line(err)
    return calls, skipped


def first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


# ---------------------------------------------------------------- fresh processes


def serve_worker(tasks: dict[str, Callable[..., dict]], payload: str) -> None:
    """Worker side: run ``tasks[kind](**args)`` and print its result as one ``RESULT`` line.

    A configuration that does not apply (e.g. a method restricted to other
    backbone families) reports status "n/a" with the reason."""
    task = json.loads(payload)
    setup_torch()
    try:
        result = {"status": "ok", **tasks[task["kind"]](**task["args"])}
    except DeltaVisionError as err:
        result = {"status": "n/a", "reason": first_line(err)}
    print(RESULT_TAG + json.dumps({**result, "load_avg": os.getloadavg()[0]}), flush=True)


def run_script(args: argparse.Namespace, tasks: dict[str, Callable[..., dict]], benchmark: Callable[..., str]) -> None:
    """A script's entry: serve ``--worker`` if given; else run ``benchmark`` (which writes the
    outputs and returns the Markdown report), print the report and the wall time."""
    global THREADS
    THREADS = args.threads
    try:
        configure(args.device, args.precision)
    except DeltaVisionError as err:
        raise SystemExit(f"error: {err}") from None
    if args.worker:
        serve_worker(tasks, args.worker)
        return
    record = RunRecord()
    print(benchmark(record))
    progress(f"wrote {args.out} in {record.elapsed_min():.1f} min")


# glibc keeps freed heap memory and, after the first free of a large block, serves blocks up
# to 32 MiB from that heap: the process's RSS then follows fragmentation, not live tensors.
# With this fixed threshold every block of 64 KiB or more is its own mapping, returned on free,
# so the peak RSS is the peak of live memory: the CPU analogue of a GPU's max allocated memory.
EXACT_ALLOCATION_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def run_in_fresh_process(script: str, kind: str, exact_allocation: bool = False, **args) -> dict:
    """Parent side: run ``script --worker`` for one task in a new interpreter; its result plus the wall time.

    ``exact_allocation``: run it with :data:`EXACT_ALLOCATION_ENV` (for memory measurements)."""
    payload = json.dumps({"kind": kind, "args": args})
    started = time.perf_counter()
    command = [sys.executable, str(Path(script).resolve()), "--worker", payload, *device_arguments()]
    env = {**os.environ, **EXACT_ALLOCATION_ENV} if exact_allocation else None
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = {"wall_s": time.perf_counter() - started}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return {**json.loads(line[len(RESULT_TAG):]), **wall}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "reason": f"worker exit {proc.returncode}: {tail}", **wall}


def device_arguments() -> list[str]:
    """This process's --device, --precision and --threads, for a worker's command line."""
    return ["--device", str(DEVICE), "--precision", PRECISION, "--threads", str(THREADS)]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe_status(result: dict, detail: Callable[[dict], str]) -> str:
    """A progress line for one worker result: ``detail(result)`` if it succeeded, else why not."""
    if result["status"] != "ok":
        return f"{result['status']} ({result['reason']})"
    return f"{detail(result)} ({result['wall_s']:.0f} s wall)"


# ---------------------------------------------------------------- command line and run record


def base_parser(doc: str, quick_help: str, precision: str = "fp32") -> argparse.ArgumentParser:
    """--quick, --out, --device, --precision and the hidden --worker every script takes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output directory (default benchmarks/results)")
    add_device_arguments(parser, precision)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def add_device_arguments(parser: argparse.ArgumentParser, precision: str = "fp32") -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--precision", default=precision, choices=["fp32", "bf16", "fp16"],
                        help=f"autocast precision of the forward pass (default {precision}; fp16 needs a GPU)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"torch threads per process (default {THREADS}; 1 when many processes share the cores)")


@dataclass
class RunRecord:
    """Load average and wall time of a whole benchmark run, for the report header."""

    load_start: float = field(default_factory=lambda: os.getloadavg()[0])
    started: float = field(default_factory=time.perf_counter)

    def elapsed_min(self) -> float:
        return (time.perf_counter() - self.started) / 60

    def environment(self) -> str:
        gpu = f"GPU {torch.cuda.get_device_name(DEVICE)}, " if on_cuda() else ""
        precision = f"precision {PRECISION}, " if PRECISION != "fp32" else ""
        return (
            f"Machine: {gpu}{precision}{os.cpu_count()} CPU cores, {THREADS} torch threads, torch {torch.__version__}, "
            f"timm {timm.__version__}, deltavision {deltavision.__version__}; 1-min load average "
            f"{self.load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
            f"date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; "
            f"wall time {self.elapsed_min():.1f} min."
        )


# ---------------------------------------------------------------- reporting


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def ratio(numerator, denominator):
    """numerator / denominator, or None if either is missing."""
    return None if numerator is None or not denominator else numerator / denominator


def add_ratios(rows: list[dict]) -> list[dict]:
    """Memory and step time relative to full fine-tuning (and memory to LoRA) on the same backbone."""
    for row in rows:
        same = {r["method"]: r for r in rows if r["backbone"] == row["backbone"] and r["status"] == "ok"}
        full, lora = same.get("full", {}), same.get("lora", {})
        row["memory_vs_full"] = ratio(row.get("peak_growth_mib"), full.get("peak_growth_mib"))
        row["memory_vs_lora"] = ratio(row.get("peak_growth_mib"), lora.get("peak_growth_mib"))
        row["step_vs_full"] = ratio(row.get("step_s"), full.get("step_s"))
    return rows


def markdown_table(headers: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def write_csv(records: list[dict], path: Path) -> None:
    """One line per record; the columns are the union of the records' keys, in first-seen order."""
    fields = list(dict.fromkeys(key for record in records for key in record))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


# ---------------------------------------------------------------- accuracy sweeps on the embedded backbone


def fitting_methods(methods) -> tuple[list[str], dict[str, str]]:
    """(the ``methods`` that fit the embedded backbone, {method: why not} for the others)."""
    from deltavision.model import method_misfit

    fitting, skipped = [], {}
    for method in methods:
        reason = method_misfit(EMBEDDED, method)
        if reason:
            skipped[method] = reason
        else:
            fitting.append(method)
    return fitting, skipped


def kept_or_trained(config) -> dict:
    """A run's summary: kept from an earlier run with the same settings, else trained in a fresh process."""
    from deltavision.compare import finished_run, train_and_keep

    kept = finished_run(Path(config.out_dir), config)
    row = {**kept, "cached": True} if kept else train_and_keep(config)
    return {**row, "seed": config.train.seed, "lr": row["config"]["train"]["lr"]}


def write_sweep(rows: list[dict], report: str, out: Path, stem: str, title: str, key: str, label: str,
                plotted: list[dict] | None = None) -> None:
    """``stem``.md (``report``), .csv (the rows without their config and folder) and .png (``key`` against
    trainable parameters, of ``plotted`` rows if given, else all) in ``out``."""
    from deltavision.train.plots import plot_accuracy_vs_params

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(report)
    write_csv([{k: v for k, v in r.items() if k not in ("config", "out_dir")} for r in rows], out / f"{stem}.csv")
    plot_accuracy_vs_params(rows if plotted is None else plotted, out / f"{stem}.png", title, key=key, label=label)
