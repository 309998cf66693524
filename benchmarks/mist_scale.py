"""MIST's feature service at scale: Ray Serve replicas, a shared Redis cache, faults under load.

1. **Load**: 50 concurrent edge clients (asyncio + httpx on loopback), each sending
   ``--requests`` requests of ``--per-request`` distinct real JPEG photos (crops of
   scikit-learn's sample photos; every image in the run is distinct), against
   ``deltavision serve`` with the embedded real EfficientNet-Lite0:

   - the uvicorn engine (one process) and Ray Serve with 1 and 2 replicas,
   - each with the shared Redis cache cold (flushed: every image computed) and then
     warm (the same images again: every image a Redis hit).

   Throughput (images/s over the wall time of the pass) and per-request p50/p99 latency.
2. **Sizing**: Redis bytes per cached image (used_memory growth / images cached), so
   images per GB of cache, and images/s per replica (cold = backbone-bound).
3. **Faults** (``--fault``): 2 replicas, ``--fault-clients`` edge clients (threads, the
   real :class:`FeatureClient` with its retries and the resumable :class:`FeatureStore`)
   each fetching ``--fault-images`` real photos; one replica SIGKILLed at 30 % of the
   requests, Redis SIGKILLed at 60 %. Every stored row is checked against an in-process
   reference service; one client is interrupted before the load and resumes in it.

Usage: ``python benchmarks/mist_scale.py [--quick] [--fault] [--out benchmarks/results]``.
Needs redis-server (Debian package) and ``pip install "deltavision[scale]"``.
Writes mist_scale.md, mist_scale.csv and mist_scale.png.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the loopback process helpers shared with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import torch  # noqa: E402

from mist import photos  # noqa: E402
from mist_processes import RedisProcess, ServiceProcess  # noqa: E402

TOKEN = "benchmark-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BACKBONE = "tf_efficientnet_lite0"
CLIENTS = 50
GB = 2**30


def log(message: str) -> None:
    print(f"[mist_scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def service_env() -> dict[str, str]:
    return {**os.environ, "DELTAVISION_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
            "RAY_memory_monitor_refresh_ms": "0"}  # fmt: skip  (other jobs' memory must not make Ray kill replicas)


def serve_arguments(engine: str, replicas: int, cache: str, image_size: int) -> list[str]:
    arguments = ["--backbone", BACKBONE, "--image-size", str(image_size), "--cache", cache, "--threads", "1",
                 "--max-wait-ms", "5", "--max-images", "16"]  # fmt: skip
    if engine == "ray":
        arguments += ["--engine", "ray", "--replicas", str(replicas), "--cpus-per-replica", "0.5"]
    return arguments


# --- load ----------------------------------------------------------------------------------------


async def _client(http: httpx.AsyncClient, batches: list[list[bytes]], latencies: list[float], failures: list[str]):
    for batch in batches:
        files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(batch)]
        started = time.perf_counter()
        response = await http.post("/v1/features", params={"dtype": "float16"}, files=files)
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            failures.append(f"{response.status_code} {response.text[:100]}")


async def _load(url: str, per_client: list[list[list[bytes]]]) -> dict:
    latencies: list[float] = []
    failures: list[str] = []
    limits = httpx.Limits(max_connections=len(per_client), max_keepalive_connections=len(per_client))
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=300, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(_client(http, batches, latencies, failures) for batches in per_client))
        seconds = time.perf_counter() - started
    images = sum(len(batch) for batches in per_client for batch in batches)
    ordered = sorted(latencies)
    return {"images": images, "requests": len(latencies), "failed": len(failures), "seconds": seconds,
            "images_per_s": images / seconds, "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}  # fmt: skip


def load_rows(redis_process: RedisProcess, work: Path, image_size: int, requests: int, per_request: int) -> list[dict]:
    import redis

    server = redis.Redis.from_url(redis_process.url)
    rows = []
    settings = [("uvicorn", 1), ("ray", 1), ("ray", 2)]
    for number, (engine, replicas) in enumerate(settings):
        blobs = photos(CLIENTS * requests * per_request, image_size, seed=100 + number)  # distinct per setting
        per_client = [[blobs[(c * requests + r) * per_request:(c * requests + r + 1) * per_request]
                       for r in range(requests)] for c in range(CLIENTS)]  # fmt: skip
        server.flushall()
        log(f"starting {engine} x{replicas}")
        service = ServiceProcess(serve_arguments(engine, replicas, redis_process.url, image_size), work, service_env())
        try:
            warmup = photos(16, image_size, seed=999)
            asyncio.run(_load(service.url, [[warmup[i:i + 4]] for i in range(0, 16, 4)]))  # first passes, imports
            used_before = int(server.info("memory")["used_memory"])
            for cache in ("cold", "warm"):
                log(f"{engine} x{replicas}, {cache} cache: {len(blobs)} images from {CLIENTS} clients")
                result = asyncio.run(_load(service.url, per_client))
                if cache == "cold":
                    cached_bytes = int(server.info("memory")["used_memory"]) - used_before
                rows.append({"engine": engine, "replicas": replicas, "cache": cache, **result,
                             "redis_bytes_per_image": cached_bytes / len(blobs)})  # fmt: skip
                log(f"  {result['images_per_s']:.1f} images/s, p50 {result['p50_ms']:.0f} ms, "
                    f"p99 {result['p99_ms']:.0f} ms, {result['failed']} failed")
        finally:
            service.stop()
    return rows


# --- faults --------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def fault_run(redis_process: RedisProcess, work: Path, image_size: int, clients: int, images: int, batch: int) -> dict:
    """2 replicas, ``clients`` edge clients fetching ``images`` photos each; a replica and Redis killed mid-load."""
    from deltavision.mist.edge.client import FeatureClient, download_features, image_item
    from deltavision.mist.edge.store import FeatureStore
    from deltavision.mist.server.service import ServiceConfig, build_service

    pool = photos(max(images * 2, 400), image_size, seed=7)
    items = [image_item(0, encoded=blob) for blob in pool]
    reference = build_service(BACKBONE, ServiceConfig(token=TOKEN), image_size=image_size, device="cpu")
    k = reference.ks[-1]
    service = ServiceProcess(serve_arguments("ray", 2, redis_process.url, image_size), work, service_env())
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    stores = [FeatureStore(work / f"edge-{n}", reference.fingerprint) for n in range(clients)]
    plans = [(items * 2)[n * 13 % len(items):][:images] for n in range(clients)]
    try:
        with FeatureClient(service.url, TOKEN) as client:  # client 0: interrupted after 3 batches, resumes below
            try:
                download_features(client, stores[0], plans[0], [k], "float16", batch_size=batch, progress=False,
                                  on_shard=_stop_after_three)  # fmt: skip
            except Interrupted:
                pass
        kept = {item.digest for item in plans[0]} - set(stores[0].missing([i.digest for i in plans[0]], [k], "float16"))
        resumed_fetch: list[str] = []

        def count(response: httpx.Response) -> None:
            if response.request.url.path != "/v1/features":
                return
            with lock:
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        def edge(number: int) -> None:
            try:
                with FeatureClient(service.url, TOKEN, retry_seconds=120) as client:
                    client.http.event_hooks["response"] = [count]
                    if number == 0:
                        fetch = client.features
                        client.features = lambda *a: _recorded(fetch(*a), resumed_fetch)
                    download_features(client, stores[number], plans[number], [k], "float16", batch_size=batch,
                                      progress=False)  # fmt: skip
            except BaseException as err:  # counted as lost below
                errors.append(err)

        before = service.replica_pids()
        total = sum(-(-len({i.digest for i in plan}) // batch) for plan in plans)
        started = time.perf_counter()
        threads = [threading.Thread(target=edge, args=(n,), daemon=True) for n in range(clients)]
        for thread in threads:
            thread.start()
        _wait_for(lambda: statuses.get(200, 0) >= 0.3 * total, 600)
        os.kill(before[0], signal.SIGKILL)
        log(f"killed replica {before[0]} after {statuses.get(200, 0)} of ~{total} requests")
        _wait_for(lambda: statuses.get(200, 0) >= 0.6 * total, 600)
        redis_process.kill()
        log(f"killed Redis after {statuses.get(200, 0)} requests")
        for thread in threads:
            thread.join(900)
        seconds = time.perf_counter() - started
        redis_process.start()
        lost = wrong = 0
        expected = _reference_rows(reference, items, k)
        for store, plan in zip(stores, plans):
            digests = list(dict.fromkeys(item.digest for item in plan))
            missing = store.missing(digests, [k], "float16")
            lost += len(missing)
            present = [d for d in digests if d not in missing]
            for digest, row in zip(present, store.read(k, "float16", present)):
                wrong += not torch.allclose(row, expected[digest], rtol=1e-2, atol=1e-2)
        _wait_for(lambda: len(service.replica_pids()) == 2 and before[0] not in service.replica_pids(), 120)
        restarted = len(set(service.replica_pids()) - set(before))
        refetched = len(set(resumed_fetch) & kept)
    finally:
        service.stop()
        reference.close()
    return {"clients": clients, "images per client": images, "requests sent": sum(statuses.values()),
            "answers by status": dict(sorted(statuses.items())), "client errors": len(errors), "lost": lost,
            "wrong": wrong, "replicas restarted": restarted, "resumed client: images kept before": len(kept),
            "resumed client: kept images fetched again": refetched, "seconds": round(seconds, 1)}  # fmt: skip


def _stop_after_three(done: int) -> None:
    if done == 3:
        raise Interrupted


def _recorded(payload, into: list[str]):
    into.extend(payload.digests)
    return payload


def _reference_rows(reference, items, k: int) -> dict[str, torch.Tensor]:
    rows = {}
    for start in range(0, len(items), 32):
        chunk = items[start:start + 32]
        gathered = reference.gather(torch.stack([reference.decode(item.read()) for item in chunk]), [k])[k]
        rows.update({item.digest: gathered[n] for n, item in enumerate(chunk)})
    return rows


def _wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {seconds} s")
        time.sleep(0.05)


# --- report --------------------------------------------------------------------------------------


def markdown(rows: list[dict], fault: dict | None, header: str) -> str:
    lines = [header, "", "## Load: 50 concurrent clients", "",
             "| engine | replicas | shared cache | images | requests | failed | images/s | p50 ms | p99 ms |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['engine']} | {row['replicas']} | {row['cache']} | {row['images']} | {row['requests']} | "
                     f"{row['failed']} | {row['images_per_s']:.1f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} |")
    lines += ["", "## Sizing", ""] + sizing(rows)
    if fault is not None:
        lines += ["", "## Faults: one replica and then Redis SIGKILLed under load (2 replicas)", "",
                  "| measure | value |", "|---|---|"]  # fmt: skip
        lines += [f"| {name} | {value} |" for name, value in fault.items()]
        lines += ["", "While Redis is down each replica computes every image it is asked for (no per-replica cache "
                  "sits in front of Redis), so the requests after the Redis kill are compute-bound."]
    return "\n".join(lines) + "\n"


def sizing(rows: list[dict]) -> list[str]:
    cold = {(r["engine"], r["replicas"]): r for r in rows if r["cache"] == "cold"}
    warm = {(r["engine"], r["replicas"]): r for r in rows if r["cache"] == "warm"}
    per_image = statistics.median(r["redis_bytes_per_image"] for r in cold.values())
    one, two = cold[("ray", 1)]["images_per_s"], cold[("ray", 2)]["images_per_s"]
    return [
        f"- Redis holds {per_image / 1024:.1f} KiB per image (all candidate k, float32, plus keys): "
        f"{GB / per_image:,.0f} images per GB of `maxmemory`.",
        f"- Computing (cold cache): {one:.1f} images/s with 1 replica, {two:.1f} with 2 "
        f"({two / one:.2f}x); uvicorn, one process: {cold[('uvicorn', 1)]['images_per_s']:.1f}.",
        f"- Serving from the shared cache (warm): {warm[('ray', 1)]['images_per_s']:.1f} images/s with 1 replica, "
        f"{warm[('ray', 2)]['images_per_s']:.1f} with 2; uvicorn {warm[('uvicorn', 1)]['images_per_s']:.1f}.",
    ]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['engine']} x{r['replicas']}\n{r['cache']}" for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(labels, [r["images_per_s"] for r in rows], color=["#4c72b0" if r["cache"] == "cold" else "#55a868" for r in rows])
    left.set_ylabel("images / s")
    left.set_title("throughput, 50 concurrent clients")
    positions = range(len(rows))
    right.bar([p - 0.2 for p in positions], [r["p50_ms"] for r in rows], width=0.4, label="p50")
    right.bar([p + 0.2 for p in positions], [r["p99_ms"] for r in rows], width=0.4, label="p99")
    right.set_xticks(list(positions), labels)
    right.set_ylabel("request latency (ms)")
    right.legend()
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as output:
        writer = csv.DictWriter(output, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--fault", action="store_true", help="also run the fault section")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--requests", type=int, default=None, help="requests per client [6; quick 2]")
    parser.add_argument("--per-request", type=int, default=4)
    parser.add_argument("--fault-clients", type=int, default=None, help="[100; quick 10]")
    parser.add_argument("--fault-images", type=int, default=None, help="images per fault client [200; quick 48]")
    args = parser.parse_args()
    requests = args.requests or (2 if args.quick else 6)
    started = time.time()
    load_average = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mist-scale-") as scratch:
        work = Path(scratch)
        redis_process = RedisProcess(work).start()
        try:
            rows = load_rows(redis_process, work, args.image_size, requests, args.per_request)
            fault = None
            if args.fault:
                clients = args.fault_clients or (10 if args.quick else 100)
                images = args.fault_images or (48 if args.quick else 200)
                log(f"fault run: {clients} clients x {images} images")
                fault = fault_run(redis_process, work, args.image_size, clients, images, batch=8)
                log(f"fault run: {fault}")
        finally:
            redis_process.kill()
    header = results_header(started, load_average, args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, fault, header)
    (args.out / "mist_scale.md").write_text(text)
    write_csv(rows, args.out / "mist_scale.csv")
    plot(rows, args.out / "mist_scale.png")
    print(text)


def results_header(started: float, load_average, args) -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cores = os.cpu_count()
    return "\n".join([
        "# MIST feature service at scale (Ray Serve replicas, shared Redis cache)", "",
        f"{BACKBONE} (real embedded weights) at {args.image_size} px, float16 transfer, {args.per_request} distinct "
        f"JPEG photos per request, {CLIENTS} concurrent clients on loopback. {cores} cores shared by the clients, "
        f"Redis, Ray's proxy and controller, and every replica (0.5 CPU and 1 torch thread each), with other "
        f"work running (load average at start {load_average[0]:.1f} / {load_average[1]:.1f} / {load_average[2]:.1f}, "
        f"at the end {os.getloadavg()[0]:.1f}). "
        f"torch {torch.__version__}, Python {platform.python_version()}, {now}, wall time {(time.time() - started) / 60:.1f} min."
        + (" --quick." if args.quick else ""), "",
        "What 2 cores can and cannot show: a second replica adds no cores here, so cold (compute-bound) throughput "
        "cannot double; the rows show the cost of Ray's proxy hop against one uvicorn process, what the shared cache "
        "saves, and that requests survive faults. Per-replica compute rates on a GPU must be measured there; the "
        "Redis bytes per image and the proxy overhead carry over.",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
