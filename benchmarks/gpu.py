"""Paper-scale cost of the tuning methods on one GPU: training memory and step time, merged-SSF latency, MIST throughput.

Swin-B (``swin_base_patch4_window7_224``) and ViT-B/16 (``vit_base_patch16_224``)
at 224 px, batch 32, bf16 autocast by default (random init: the costs do not
depend on the weight values):

* **Training memory and step time** of full, lora, mona, ssf and e3va (rank 8),
  each in a fresh process: ``common.peak_growth`` over the memory steps (on
  CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus what
  weights and batch already held; also ``max_memory_reserved``), then the
  median of the timed steps (synchronized on CUDA). Reported as ratios to full.
* **Merged-SSF inference latency**: one fresh process per backbone times the
  plain timm model, SSF folded by ``deltavision.merge`` (its trainable
  tensors perturbed first, as if trained) and SSF unmerged, interleaved, at
  the same batch, under ``no_grad`` and the same autocast; ratios to plain.
* **MIST service throughput**: images/s of ``deltavision.mist.Gather`` (the
  service's frozen pass, the backbone held in the precision, features back
  to the CPU as float32) on the device, at the same batch, in a fresh process.

Targets (E3VA, as in ``e3va.py``): memory <= 0.35x full and <= 0.6x LoRA;
step time <= 0.6x full. Writes ``gpu.md`` (table and PASS/MISS lines),
``gpu.csv`` and ``gpu.png``. ``--quick`` swaps in tiny random-init
architectures of the same two families at small size so the CPU path runs in
well under a minute (a smoke test; its numbers mean nothing) and writes to
``benchmarks/runs/gpu-quick/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import copy
import functools
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import deltavision  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR, RunRecord, add_ratios, base_parser, build_model, build_plain, describe_status, fixed_batch, fmt,
    interleaved_medians, markdown_table, no_grad_forward, peak_growth, progress, pyplot, run_in_fresh_process, run_script, save_figure, synchronize, training_call, write_csv,
)
import common  # noqa: E402

METHODS = {"full": {}, "lora": {}, "mona": {}, "ssf": {}, "e3va": {"rank": 8}}
MEMORY_TARGET_FULL, MEMORY_TARGET_LORA, TIME_TARGET_FULL = 0.35, 0.6, 0.6
QUICK_OUT = Path(__file__).resolve().parent / "runs" / "gpu-quick"


@dataclass
class Setting:
    backbones: dict[str, dict] = field(default_factory=lambda: {
        "swin_base_patch4_window7_224": {}, "vit_base_patch16_224": {},
    })
    image_size: int = 224
    batch: int = 32
    memory_steps: int = 3
    warmup_steps: int = 2
    timed_steps: int = 10
    latency_warmup: int = 3
    latency_runs: int = 20
    gather_passes: int = 10
    jobs: int = 1  # fresh processes run at once


FULL_SETTING = Setting()
QUICK_SETTING = Setting(
    backbones={
        "swin_base_patch4_window7_224": {"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 2, 2),
                                         "window_size": 4},
        "vit_base_patch16_224": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8},
    },
    image_size=64, batch=4, memory_steps=2, warmup_steps=1, timed_steps=2, latency_warmup=1, latency_runs=2,
    gather_passes=2, jobs=2,
)


# ---------------------------------------------------------------- worker side


def measure_training(backbone: str, architecture: dict, method: str, setting: dict) -> dict:
    """Peak memory growth over the memory steps, then the median of the timed steps, of one method."""
    s = Setting(**setting)
    model = build_model(backbone, method, s.image_size, METHODS[method], architecture)
    images, labels = fixed_batch(s.batch, s.image_size)
    made = {}

    def make_call(*args):
        made["step"] = training_call(*args)
        return made["step"]

    memory = peak_growth(model, images, labels, make_call, s.memory_steps)
    step = interleaved_medians(made, s.warmup_steps, s.timed_steps)["step"]
    return {**deltavision.count_parameters(model), **memory, "step_s": step}


def perturb_trainable(model) -> None:
    """Seeded noise (std 0.01) on the trainable tensors, as if training had moved them."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn(param.shape, generator=generator).to(param.device))


def measure_inference(backbone: str, architecture: dict, setting: dict) -> dict:
    """Latency (ms) of plain timm, merged SSF and unmerged SSF (interleaved), and Gather images/s."""
    from deltavision.mist import Gather

    s = Setting(**setting)
    images, _ = fixed_batch(s.batch, s.image_size)
    ssf = build_model(backbone, "ssf", s.image_size, architecture=architecture).eval()
    perturb_trainable(ssf)
    models = {
        "plain": build_plain(backbone, s.image_size, architecture).eval(),
        "ssf merged": deltavision.merge(copy.deepcopy(ssf)).eval(),
        "ssf unmerged": ssf,
    }
    calls = {name: functools.partial(no_grad_forward, model, images) for name, model in models.items()}
    ms = {name: 1000 * t for name, t in interleaved_medians(calls, s.latency_warmup, s.latency_runs).items()}
    del models, calls, ssf
    gather = Gather(build_plain(backbone, s.image_size, architecture), device=str(common.DEVICE),
                    precision=common.PRECISION)
    gather(images)  # warm-up
    synchronize()
    started = time.perf_counter()
    for _ in range(s.gather_passes):
        gather(images)  # features come back to the CPU: every pass ends synchronized
    images_per_s = s.gather_passes * s.batch / (time.perf_counter() - started)
    return {"latency_ms": ms, "gather_images_per_s": images_per_s}


TASKS = {"train": measure_training, "inference": measure_inference}


# ---------------------------------------------------------------- parent side


def run_all(setting: Setting) -> tuple[list[dict], dict[str, dict]]:
    jobs = [(b, m) for b in setting.backbones for m in METHODS]
    common_args = {"setting": asdict(setting)}

    def train(job):
        backbone, method = job
        result = run_in_fresh_process(__file__, "train", exact_allocation=not common.on_cuda(), backbone=backbone,
                                      architecture=setting.backbones[backbone], method=method, **common_args)
        progress(f"{backbone} {method}: " + describe_status(
            result, lambda r: f"+{r['peak_growth_mib']:.0f} MiB peak, {r['step_s']:.3f} s/step"))
        return {"backbone": backbone, "method": method, **result}

    def infer(backbone):
        result = run_in_fresh_process(__file__, "inference", backbone=backbone,
                                      architecture=setting.backbones[backbone], **common_args)
        progress(f"{backbone} inference: " + describe_status(
            result, lambda r: f"merged SSF {r['latency_ms']['ssf merged']:.1f} ms vs plain "
                              f"{r['latency_ms']['plain']:.1f} ms, Gather {r['gather_images_per_s']:.1f} img/s"))
        return backbone, result

    with ThreadPoolExecutor(max_workers=setting.jobs) as pool:
        rows = list(pool.map(train, jobs))
        inference = dict(pool.map(infer, setting.backbones))
    return add_ratios(rows), inference


def target_lines(rows: list[dict]) -> list[str]:
    """One PASS/MISS line per backbone and E3VA target (MISS also when a number is missing)."""
    lines = []
    for row in (r for r in rows if r["method"] == "e3va"):
        for name, key, limit in (("memory vs full", "memory_vs_full", MEMORY_TARGET_FULL),
                                 ("memory vs LoRA", "memory_vs_lora", MEMORY_TARGET_LORA),
                                 ("step time vs full", "step_vs_full", TIME_TARGET_FULL)):
            value = row.get(key)
            verdict = "PASS" if value is not None and value <= limit else "MISS"
            lines.append(f"{verdict}: {row['backbone']} e3va-r8 {name} {fmt(value, '.2f')} (target <= {limit})")
    return lines


def training_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        lines.append([
            r["backbone"], r["method"], f"{r['trainable']:,}" if ok else r["status"],
            fmt(r.get("peak_growth_mib"), ".0f"), fmt(r.get("peak_reserved_growth_mib"), ".0f"),
            fmt(r.get("memory_vs_full"), ".2f"), fmt(r.get("memory_vs_lora"), ".2f"),
            fmt(r.get("step_s"), ".4f"), fmt(r.get("step_vs_full"), ".2f"),
        ])
    headers = ["Backbone", "Method", "Trainable", "Peak mem. growth (MiB)", "Reserved growth (MiB)",
               "Mem. vs full", "Mem. vs LoRA", "Step (s)", "Step vs full"]
    return markdown_table(headers, lines)


def inference_table(inference: dict[str, dict]) -> str:
    lines = []
    for backbone, r in inference.items():
        if r["status"] != "ok":
            lines.append([backbone, r["status"], "—", "—", "—", "—"])
            continue
        ms = r["latency_ms"]
        lines.append([backbone, f"{ms['plain']:.2f}", f"{ms['ssf merged']:.2f}",
                      f"{ms['ssf merged'] / ms['plain']:.2f}", f"{ms['ssf unmerged'] / ms['plain']:.2f}",
                      f"{r['gather_images_per_s']:.1f}"])
    headers = ["Backbone", "Plain timm (ms)", "Merged SSF (ms)", "Merged / plain", "Unmerged / plain",
               "MIST Gather (images/s)"]
    return markdown_table(headers, lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 4), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        mine = [r for r in rows if r["backbone"] == backbone]
        x = range(len(mine))
        ax.bar([i - 0.2 for i in x], [r.get("memory_vs_full") or 0 for r in mine], 0.4, color="tab:blue",
               label="peak memory / full")
        ax.bar([i + 0.2 for i in x], [r.get("step_vs_full") or 0 for r in mine], 0.4, color="tab:orange",
               label="step time / full")
        ax.axhline(MEMORY_TARGET_FULL, color="tab:blue", linestyle=":")
        ax.axhline(TIME_TARGET_FULL, color="tab:orange", linestyle=":")
        ax.set_xticks(list(x), [r["method"] for r in mine])
        ax.set_title(backbone, fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def write_outputs(setting: Setting, record: RunRecord, out: Path, quick: bool) -> str:
    rows, inference = run_all(setting)
    out.mkdir(parents=True, exist_ok=True)
    what = "tiny random-init architectures (--quick: a smoke test, numbers mean nothing)" if quick else "random init"
    memory = "max_memory_allocated growth" if common.on_cuda() else "peak RSS growth"
    report = "\n\n".join([
        "# Tuning methods on one device",
        f"Device {common.DEVICE}, {what}; {setting.image_size} px, batch "
        f"{setting.batch}; memory: {memory} over {setting.memory_steps} steps (fresh process per method); step: "
        f"median of {setting.timed_steps} steps after {setting.warmup_steps} warm-up; latency: median of "
        f"{setting.latency_runs} interleaved rounds; Gather: {setting.gather_passes} passes. " + record.environment(),
        "## Training (ratios to full fine-tuning on the same backbone)",
        training_table(rows),
        "## Inference: merged SSF vs plain timm, and the MIST feature service's Gather pass",
        inference_table(inference),
        "## E3VA targets",
        "\n".join(target_lines(rows)),
    ])
    (out / "gpu.md").write_text(report + "\n")
    write_csv(rows + [{"backbone": b, "method": "inference", **r} for b, r in inference.items()], out / "gpu.csv")
    plot(rows, out / "gpu.png")
    return report


def main(argv=None) -> None:
    parser = base_parser(__doc__, "tiny architectures at 64 px, batch 4 (a smoke test for the CPU path)", "bf16")
    parser.set_defaults(out=None)
    args = parser.parse_args(argv)
    args.out = args.out or (QUICK_OUT if args.quick else RESULTS_DIR)
    setting = QUICK_SETTING if args.quick else FULL_SETTING
    run_script(args, TASKS, lambda record: write_outputs(setting, record, args.out, args.quick))


if __name__ == "__main__":
    main()
