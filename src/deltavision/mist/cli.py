"""Command line of separated tuning: ``deltavision serve`` and ``deltavision edge fit|eval|predict``.

``python -m deltavision.mist serve|edge ...`` runs the same commands without the rest of the CLI.

Only typer and rich are imported here; each command imports what it needs when
it runs, so the edge commands never load timm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

console = Console()

TOKEN_HELP = "Bearer token shared by service and clients [env: DELTAVISION_TOKEN]."
SERVER_HELP = "Feature service URL, e.g. http://127.0.0.1:8765."
THREADS_HELP = "Torch threads; the edge network is small, and one thread avoids OpenMP contention on shared CPUs."
RETRY_HELP = "How long to keep retrying an unreachable or busy service (exponential backoff) before giving up."
DATA_HELP = (
    "Classification: an image folder (train/ and val/, or class folders to split) or fashion-mnist, mnist5k, digits. "
    "Segmentation: fashion-scenes, or a Pascal VOC, ADE20K or images/ + masks/ + classes.txt folder."
)
TASK_HELP = "classification, or segmentation (LAE plus a SegFormer-style decoder on the token grid; masks stay on the edge)."

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

edge_app = typer.Typer(
    help="Train and use a MIST edge network on features from a `deltavision serve` service; no backbone needed.",
    no_args_is_help=True,
    add_completion=False,
)


LOW_MEMORY_HELP = "Return freed tensor memory to the system at once (lower peak RSS, slower steps)."


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _edge_process(threads: int, low_memory: bool) -> None:
    """Settings every edge command applies before it allocates anything."""
    _set_threads(threads)
    if low_memory:
        from ..memory import release_large_blocks

        release_large_blocks()


def _backbone_options(pairs: Optional[List[str]]) -> dict:
    """``--backbone-opt key=value`` pairs, read by the one option grammar (:mod:`deltavision.options`)."""
    from ..options import backbone_options

    return backbone_options(pairs)


def serve_command(
    backbone: str = typer.Option(..., help="timm model name, e.g. vit_base_patch16_224 or tf_efficientnet_lite0."),
    checkpoint: Optional[Path] = typer.Option(None, help="Local backbone weights (.safetensors/.pth) instead of the hub."),
    pretrained: bool = typer.Option(True, help="Pretrained weights (hub, embedded default, or --checkpoint)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (anything but loopback should use TLS)."),
    port: int = typer.Option(8765, min=1, max=65535),
    token: Optional[str] = typer.Option(
        None, envvar="DELTAVISION_TOKEN", help=TOKEN_HELP + " At least 16 characters; generated and printed if absent."
    ),
    ssl_keyfile: Optional[Path] = typer.Option(None, help="TLS private key (PEM); serve HTTPS with --ssl-certfile."),
    ssl_certfile: Optional[Path] = typer.Option(None, help="TLS certificate chain (PEM)."),
    image_size: Optional[int] = typer.Option(None, min=8, help="Input size [default: the backbone's]."),
    backbone_opt: Optional[List[str]] = typer.Option(None, help="timm model option key=value (repeatable)."),
    max_batch: int = typer.Option(32, min=1, help="Most images per backbone pass (micro-batching)."),
    max_wait_ms: float = typer.Option(5.0, min=0.0, help="Longest wait for a batch to fill."),
    cache_mb: int = typer.Option(512, min=0, help="Feature cache size (LRU by image digest); with Redis, its maxmemory."),
    cache: str = typer.Option("memory", help="Feature cache: 'memory' (in-process LRU) or redis://HOST:PORT/DB, shared by every replica and service."),
    engine: str = typer.Option("uvicorn", help="uvicorn (one process) or ray (Ray Serve replicas; pip install 'deltavision[scale]')."),
    replicas: int = typer.Option(1, min=1, help="Ray Serve replicas (--engine ray)."),
    min_replicas: Optional[int] = typer.Option(None, min=0, help="Autoscale down to this many replicas (--engine ray)."),
    max_replicas: Optional[int] = typer.Option(None, min=1, help="Autoscale up to this many replicas (--engine ray)."),
    cpus_per_replica: float = typer.Option(1.0, min=0.0, help="CPUs Ray reserves per replica (--engine ray)."),
    gpus_per_replica: float = typer.Option(0.0, min=0.0, help="GPUs per replica, fractions allowed (--engine ray)."),
    max_body_mb: float = typer.Option(32.0, min=0.01, help="Largest accepted request body."),
    max_images: int = typer.Option(64, min=1, help="Most images per request."),
    max_pixels: int = typer.Option(4096 * 4096, min=1, help="Largest accepted image (width x height)."),
    max_request_mpixels: float = typer.Option(64.0, min=0.001, help="Most decoded megapixels (2^20) per request."),
    header_timeout: float = typer.Option(10.0, min=0.1, help="Seconds a client has to send request line and headers."),
    body_timeout: float = typer.Option(30.0, min=0.1, help="Seconds a client has to send a request body."),
    keep_alive: float = typer.Option(5.0, min=0.1, help="Seconds an idle keep-alive connection stays open."),
    threads: Optional[int] = typer.Option(None, min=1, help="Torch threads for the backbone [default: torch's]."),
    device: str = typer.Option("auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("fp32", help="Hold and run the frozen backbone in fp32, bf16 or fp16 (GPUs)."),
) -> None:
    """Serve Gather_k features of a frozen backbone over HTTP (MIST separated tuning)."""
    from ..memory import release_large_blocks
    from .server.app import serve
    from .server.redis_cache import check_redis_url
    from .server.service import MIB, ServiceConfig, build_service, check_token

    token = _service_token(token)
    check_token(token)
    tls = _tls_files(ssl_keyfile, ssl_certfile)
    scaling = _scaling(engine, replicas, min_replicas, max_replicas, cpus_per_replica, gpus_per_replica)
    if cache != "memory":
        check_redis_url(cache)
    _set_threads(threads)
    release_large_blocks()  # decoded images go back to the system when freed
    config = ServiceConfig(
        token=token, max_batch=max_batch, max_wait_ms=max_wait_ms, cache_bytes=cache_mb * MIB,
        max_body_bytes=int(max_body_mb * MIB), max_images=max_images, max_pixels=max_pixels,
        max_request_pixels=int(max_request_mpixels * 2**20), body_timeout=body_timeout,
        cache_url=None if cache == "memory" else cache,
    )  # fmt: skip
    if scaling is not None:
        from .server.ray_engine import ReplicaSpec

        _serve_on_ray(
            ReplicaSpec(backbone, config, checkpoint=str(checkpoint) if checkpoint else None, pretrained=pretrained,
                        image_size=image_size, backbone_options=_backbone_options(backbone_opt), device=device,
                        precision=precision, threads=threads),
            scaling, host, port, keep_alive, tls,
        )  # fmt: skip
        return
    service = build_service(
        backbone, config, checkpoint=checkpoint, pretrained=pretrained, image_size=image_size,
        backbone_options=_backbone_options(backbone_opt) or None, device=device, precision=precision,
    )  # fmt: skip
    info = service.info()
    scheme = "https" if tls else "http"
    console.print(
        f"serving {backbone} on {scheme}://{host}:{port}: Gather_k over {info['num_blocks']} blocks, "
        f"k in {info['ks']}, {info['feature_shape'][0]} x {info['feature_shape'][1]} per image",
        highlight=False,
    )
    if not tls and not _is_loopback(host):
        console.print(
            f"[yellow]warning:[/] {host} is reachable from other machines and the token and images travel "
            "unencrypted; pass --ssl-keyfile and --ssl-certfile",
            highlight=False,
        )
    try:
        serve(
            service, host, port, header_timeout=header_timeout, keep_alive_timeout=keep_alive,
            ssl_keyfile=tls[0] if tls else None, ssl_certfile=tls[1] if tls else None,
        )  # fmt: skip
    finally:
        service.close()


ENGINES = ("uvicorn", "ray")


def _scaling(engine: str, replicas: int, min_replicas, max_replicas, cpus: float, gpus: float):
    """Ray Serve's replica settings for ``--engine ray`` (None for uvicorn); refuses options that do not fit."""
    from ..errors import DeltaVisionError

    if engine not in ENGINES:
        raise DeltaVisionError(f"--engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "uvicorn":
        given = [name for name, value, default in (("--replicas", replicas, 1), ("--min-replicas", min_replicas, None),
                 ("--max-replicas", max_replicas, None), ("--gpus-per-replica", gpus, 0.0)) if value != default]  # fmt: skip
        if given:
            raise DeltaVisionError(f"{', '.join(given)} need --engine ray (uvicorn serves one process)")
        return None
    if min_replicas is not None and max_replicas is not None and min_replicas > max_replicas:
        raise DeltaVisionError(f"--min-replicas {min_replicas} is more than --max-replicas {max_replicas}")
    try:
        from .server.ray_engine import Scaling
    except ImportError as err:
        raise DeltaVisionError(f"--engine ray needs Ray Serve ({err}): pip install 'deltavision[scale]'") from err
    return Scaling(replicas, min_replicas, max_replicas, cpus, gpus)


def _serve_on_ray(spec, scaling, host: str, port: int, keep_alive: float, tls) -> None:
    from .server import ray_engine

    bounds = (f"{scaling.replicas} replica(s)" if scaling.min_replicas is None and scaling.max_replicas is None
              else f"{scaling.min_replicas or 1}..{scaling.max_replicas or scaling.replicas} replicas (autoscaling)")  # fmt: skip
    scheme = "https" if tls else "http"
    ready = lambda: console.print(f"serving {spec.backbone} on {scheme}://{host}:{port} with Ray Serve, {bounds}; "  # noqa: E731
                                  f"cache {spec.config.cache_url or 'in-process per replica'}", highlight=False)  # fmt: skip
    ray_engine.run(spec, scaling, host, port, keep_alive_timeout=keep_alive, ssl_keyfile=tls[0] if tls else None,
                   ssl_certfile=tls[1] if tls else None, on_ready=ready)  # fmt: skip


def _service_token(token: Optional[str]) -> str:
    """The given token, or a fresh random one printed for the clients."""
    if token:
        return token
    import secrets

    token = secrets.token_urlsafe(24)
    console.print(f"no --token given; clients must send this one: {token}", highlight=False, soft_wrap=True)
    return token


def _tls_files(keyfile: Optional[Path], certfile: Optional[Path]) -> Optional[tuple[str, str]]:
    """(key, certificate) paths when both are given; None when neither is."""
    from ..errors import DeltaVisionError

    if keyfile is None and certfile is None:
        return None
    if keyfile is None or certfile is None:
        raise DeltaVisionError("TLS needs both --ssl-keyfile and --ssl-certfile")
    for path in (keyfile, certfile):
        if not Path(path).is_file():
            raise DeltaVisionError(f"no such TLS file: {path}")
    return str(keyfile), str(certfile)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@edge_app.command("fit")
def edge_fit(
    out: Path = typer.Option(..., help="Folder for edge_model.safetensors and edge_config.json."),
    server: Optional[str] = typer.Option(None, help=SERVER_HELP),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    token: Optional[str] = typer.Option(None, envvar="DELTAVISION_TOKEN", help=TOKEN_HELP),
    task: str = typer.Option("classification", help=TASK_HELP),
    k: str = typer.Option("auto", help="Gather depth: 'auto' (best of the service's candidates on val) or one of them."),
    dtype: str = typer.Option("float16", help="Transfer dtype: float32, float16 or int8."),
    cache: Optional[Path] = typer.Option(None, help="Local feature cache [default: OUT/feature-cache]."),
    offline: bool = typer.Option(False, help="Train from the feature cache alone (its recorded dataset); no service."),
    retry_seconds: float = typer.Option(60.0, min=0.0, help=RETRY_HELP),
    epochs: int = typer.Option(10, min=1),
    select_epochs: int = typer.Option(3, min=1, help="Epochs per candidate when --k auto."),
    batch_size: int = typer.Option(32, min=1),
    lr: float = typer.Option(3e-3, min=0.0, help="AdamW peak learning rate."),
    weight_decay: float = typer.Option(0.05, min=0.0),
    warmup_epochs: float = typer.Option(1.0, min=0.0),
    label_smoothing: float = typer.Option(0.1, min=0.0, max=0.99),
    blocks: int = typer.Option(4, min=0, help="LAE blocks."),
    qkv_width: Optional[int] = typer.Option(None, min=1, help="Query/key/value width [default: max(8, C // 48), 16 at C = 768 as the paper says; 30 reproduces its Table 4 parameter count]."),
    heads: int = typer.Option(1, min=1),
    decoder_width: int = typer.Option(128, min=1, help="Segmentation: channels of the decoder's convolutions."),
    val_fraction: float = typer.Option(0.2, help="Share of each class held out when the data has no val split."),
    train_limit: Optional[int] = typer.Option(None, min=1),
    val_limit: Optional[int] = typer.Option(None, min=1),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, help="Replace an edge model already in --out."),
    threads: int = typer.Option(1, min=1, help=THREADS_HELP),
    low_memory: bool = typer.Option(True, help=LOW_MEMORY_HELP),
    device: str = typer.Option("auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."),
) -> None:
    """Fetch each image's features once, choose k, train the low-rank attention edge network, save it."""
    from .edge.fit import FitConfig
    from .edge.commands import FitOptions, fit_edge

    _edge_process(threads, low_memory)
    options = FitOptions(
        out=out, server=server, token=token, data=data, cache=cache, k=k, dtype=dtype, offline=offline,
        val_fraction=val_fraction, train_limit=train_limit, val_limit=val_limit, num_blocks=blocks,
        qkv_width=qkv_width, heads=heads, overwrite=overwrite, retry_seconds=retry_seconds,
        task=task, decoder_width=decoder_width,
        fit=FitConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
            label_smoothing=label_smoothing, select_epochs=select_epochs, seed=seed, device=device,
        ),
    )  # fmt: skip
    summary = fit_edge(options)
    metric = "mIoU" if task == "segmentation" else "top-1"
    if summary["k_scores"]:
        scores = ", ".join(f"k={key}: {value:.1f}%" for key, value in summary["k_scores"].items())
        console.print(f"k selection (val {metric} after {select_epochs} epochs): {scores}", highlight=False)
    score = (
        f"val mIoU {summary['miou']:.2f}%, pixel accuracy {summary['pixel_acc']:.2f}%"
        if task == "segmentation" else f"val top-1 {summary['top1']:.2f}%"
    )  # fmt: skip
    console.print(
        f"edge network k={summary['k']} {summary['dtype']}: {score} on "
        f"{summary['val_images']} images, {summary['trainable_parameters']:,} parameters; saved in {out}",
        highlight=False,
    )


@edge_app.command("eval")
def edge_eval(
    model: Path = typer.Argument(..., help="Folder written by `deltavision edge fit`."),
    server: Optional[str] = typer.Option(None, help=SERVER_HELP),
    token: Optional[str] = typer.Option(None, envvar="DELTAVISION_TOKEN", help=TOKEN_HELP),
    data: Optional[str] = typer.Option(None, help=DATA_HELP + " [default: the training data]"),
    cache: Optional[Path] = typer.Option(None, help="Local feature cache [default: the one used by fit]."),
    offline: bool = typer.Option(False, help="Evaluate on the cached validation split; no service."),
    retry_seconds: float = typer.Option(60.0, min=0.0, help=RETRY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    threads: int = typer.Option(1, min=1, help=THREADS_HELP),
    low_memory: bool = typer.Option(True, help=LOW_MEMORY_HELP),
) -> None:
    """Top-1, or mIoU and IoU per class, of an edge network on a validation split."""
    from .edge.commands import evaluate_saved_edge

    _edge_process(threads, low_memory)
    metrics = evaluate_saved_edge(
        model, server=server, token=token, data=data, cache=cache, offline=offline, retry_seconds=retry_seconds
    )
    if as_json:
        print(json.dumps(metrics))
    elif "miou" in metrics:
        _print_segmentation_metrics(metrics)
    else:
        console.print(f"top-1 {metrics['top1']:.2f}% on {metrics['images']} images", highlight=False)


def _print_segmentation_metrics(metrics: dict) -> None:
    """mIoU and pixel accuracy, then a table of IoU per class ("-": absent from targets and predictions)."""
    from rich.table import Table

    console.print(
        f"mIoU {metrics['miou']:.2f}%, pixel accuracy {metrics['pixel_acc']:.2f}% on {metrics['images']} images",
        highlight=False,
    )
    table = Table("class", "IoU %")
    for key, value in metrics.items():
        if key.startswith("iou/"):
            table.add_row(key[4:], "-" if value is None else f"{value:.2f}")
    console.print(table)


@edge_app.command("predict")
def edge_predict(
    model: Path = typer.Argument(..., help="Folder written by `deltavision edge fit`."),
    images: List[Path] = typer.Argument(..., help="Image files to classify or segment."),
    server: str = typer.Option(..., help=SERVER_HELP),
    out: Optional[Path] = typer.Option(None, help="Segmentation: folder for one palette PNG mask per image."),
    token: Optional[str] = typer.Option(None, envvar="DELTAVISION_TOKEN", help=TOKEN_HELP),
    retry_seconds: float = typer.Option(60.0, min=0.0, help=RETRY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines only."),
    threads: int = typer.Option(1, min=1, help=THREADS_HELP),
    low_memory: bool = typer.Option(True, help=LOW_MEMORY_HELP),
) -> None:
    """Label images (or write their masks) with an edge network, fetching their features from the service."""
    from .edge.commands import predict_files
    from .edge.network import read_edge_config

    _edge_process(threads, low_memory)
    if read_edge_config(model).task == "segmentation":
        _predict_masks(model, images, out, server, token, retry_seconds, as_json)
        return
    for row in predict_files(model, images, server=server, token=token, retry_seconds=retry_seconds):
        if as_json:
            print(json.dumps(row))
        else:
            console.print(f"{row['image']}\t{row['label']}\t{row['probability']:.3f}", highlight=False, soft_wrap=True)


def _predict_masks(model: Path, images: List[Path], out: Optional[Path], server: str, token: Optional[str],
                   retry_seconds: float, as_json: bool) -> None:
    from ..errors import DeltaVisionError
    from .edge.segmentation_commands import predict_masks

    if out is None:
        raise DeltaVisionError(f"{model} is a segmentation edge model: pass --out DIR for its mask PNGs")
    for row in predict_masks(model, images, out, server=server, token=token, retry_seconds=retry_seconds):
        if as_json:
            print(json.dumps(row))
        else:
            console.print(f"{row['image']}\t{row['mask']}\t{', '.join(row['classes'])}", highlight=False, soft_wrap=True)


app.command("serve")(serve_command)
app.add_typer(edge_app, name="edge")


def main() -> None:
    """Run the MIST commands; a DeltaVisionError becomes one line on stderr and exit status 2."""
    import sys

    from ..errors import DeltaVisionError

    try:
        app()
    except DeltaVisionError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
