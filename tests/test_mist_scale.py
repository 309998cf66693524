"""The feature service at scale: /metrics and /healthz, the shared Redis cache (a real
redis-server on loopback, killed and filled), the same requests against the uvicorn and the
Ray Serve engine, and a replica and Redis killed under load.

redis-server (Debian package) and the ``scale`` extra (Ray Serve, redis, prometheus-client)
are installed by the README's test command and .ci/run; a missing one fails, never skips.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
import timm
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

from deltavision.data import write_image_folder
from deltavision.errors import DeltaVisionError
from deltavision.mist.edge.client import FeatureClient, download_features, image_item
from deltavision.mist.edge.store import FeatureStore
from deltavision.mist.server.app import create_app
from deltavision.mist.server.redis_cache import CacheURLError, check_redis_url, image_keys
from deltavision.mist.server.service import FeatureService, ServiceConfig, build_service
from deltavision.mist.wire import unpack
from mist_processes import RedisProcess, ServiceProcess
from test_mist_service import AUTH, TINY_VIT, TOKEN, files, png

VIT = "vit_small_patch16_224"
# Ray kills its workers when the whole machine's memory is over 95 % used, however little Ray itself uses;
# on a shared test machine other jobs fill it, so the tests leave memory pressure to the kernel.
RAY_ON_A_SHARED_MACHINE = {"RAY_memory_monitor_refresh_ms": "0"}
LIMITS = ["--max-images", "4", "--max-body-mb", "0.2", "--max-wait-ms", "5"]


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label pairs): value} of a Prometheus exposition."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def sample(values: dict, name: str, **labels) -> float:
    """The one sample ``name`` whose labels include ``labels``."""
    found = [v for (n, pairs), v in values.items() if n == name and set(labels.items()) <= set(pairs)]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model(VIT, pretrained=False, num_classes=0, **TINY_VIT).eval()


def make_service(model, **config) -> FeatureService:
    config = ServiceConfig(token=TOKEN, max_wait_ms=2.0, **config)
    return FeatureService(model, backbone=VIT, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, config=config,
                          backbone_options=TINY_VIT)  # fmt: skip


@pytest.fixture()
def redis_process(tmp_path):
    """A redis-server of this test alone (it may be killed); gone after the test."""
    try:
        process = RedisProcess(tmp_path).start()
    except RuntimeError as err:
        pytest.fail(str(err))
    yield process
    process.kill()


# --- /metrics and /healthz -----------------------------------------------------------------------


def test_metrics_count_requests_batches_and_cache(model):
    service = make_service(model)
    try:
        client = TestClient(create_app(service))
        assert client.post("/v1/features", files=files(png(1), png(2)), headers=AUTH).status_code == 200
        assert client.post("/v1/features", files=files(png(1)), headers=AUTH).status_code == 200
        assert client.post("/v1/features", files=files(png(1)), headers={}).status_code == 401
        assert client.post("/v1/features?k=9", files=files(png(1)), headers=AUTH).status_code == 400
        response = client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        values = metric_values(response.text)
    finally:
        service.close()
    assert sample(values, "deltavision_requests_total", endpoint="/v1/features", status="200") == 2
    assert sample(values, "deltavision_requests_total", endpoint="/v1/features", status="401") == 1
    assert sample(values, "deltavision_requests_total", endpoint="/v1/features", status="400") == 1
    assert sample(values, "deltavision_request_seconds_count", endpoint="/v1/features") == 4
    assert sample(values, "deltavision_batch_size_sum") == 2 and sample(values, "deltavision_batch_size_count") == 1
    assert sample(values, "deltavision_images_computed_total") == 2
    assert sample(values, "deltavision_cache_hits_total", cache="memory") == 1
    assert sample(values, "deltavision_cache_misses_total") == 2
    assert sample(values, "deltavision_cache_evictions_total") == 0
    assert sample(values, "deltavision_queue_depth") == 0
    assert sample(values, "deltavision_images_per_second") == pytest.approx(2 / 60)
    assert sample(values, "deltavision_requests_rejected_total") == 2


def test_in_process_cache_evictions_are_counted(model):
    one_entry = 4 * 17 * 32 * 4  # four k of 17 x 32 float32
    service = make_service(model, cache_bytes=one_entry)
    try:
        client = TestClient(create_app(service))
        for seed in (1, 2, 3):
            assert client.post("/v1/features", files=files(png(seed)), headers=AUTH).status_code == 200
        values = metric_values(client.get("/metrics").text)
    finally:
        service.close()
    assert sample(values, "deltavision_cache_evictions_total") == 2
    assert sample(values, "deltavision_cache_bytes") == one_entry


def test_healthz_is_ok_until_the_batching_worker_stops(model):
    service = make_service(model)
    client = TestClient(create_app(service))
    assert client.get("/healthz").json() == {"status": "ok", "batching": True, "cache": {"kind": "memory", "reachable": True}}
    service.close()  # the worker thread ends: nothing could be computed any more
    stopped = client.get("/healthz")
    assert stopped.status_code == 503 and stopped.json()["error"]["code"] == "unavailable"


# --- the shared Redis cache ------------------------------------------------------------------------


def test_redis_cache_is_shared_keyed_and_bounded(model, redis_process):
    bound = 64 * 2**20
    first = make_service(model, cache_url=redis_process.url, cache_bytes=bound)
    second = make_service(model, cache_url=redis_process.url, cache_bytes=bound)
    torch.manual_seed(1)
    other_weights = timm.create_model(VIT, pretrained=False, num_classes=0, **TINY_VIT).eval()
    other = make_service(other_weights, cache_url=redis_process.url, cache_bytes=bound)
    server = redis.Redis.from_url(redis_process.url)
    try:
        blobs = [png(11), png(12)]
        answer = TestClient(create_app(first)).post("/v1/features?k=all", files=files(*blobs), headers=AUTH)
        assert answer.headers["x-deltavision-cache-hits"] == "0"
        shared = TestClient(create_app(second)).post("/v1/features?k=all", files=files(*blobs), headers=AUTH)
        assert shared.headers["x-deltavision-cache-hits"] == "2" and shared.content == answer.content
        assert second.stats()["batching"]["images_computed"] == 0  # computed by the first service only
        elsewhere = TestClient(create_app(other)).post("/v1/features?k=all", files=files(*blobs), headers=AUTH)
        assert elsewhere.headers["x-deltavision-cache-hits"] == "0"  # other weights: other keys
        digest = unpack(answer.content).digests[0]
        assert server.exists(*image_keys(first.fingerprint, digest, first.ks)) == 4
        assert server.exists(*image_keys(other.fingerprint, digest, other.ks)) == 4
        assert server.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        assert int(server.config_get("maxmemory")["maxmemory"]) == bound
    finally:
        for service in (first, second, other):
            service.close()


def test_redis_killed_mid_use_degrades_and_recovers(model, redis_process):
    service = make_service(model, cache_url=redis_process.url)
    service.batcher.cache.retry_after = 0.5
    client = TestClient(create_app(service))
    try:
        stored = client.post("/v1/features", files=files(png(21)), headers=AUTH)
        assert stored.status_code == 200
        redis_process.kill()
        for seed in (21, 22, 23):  # cached in the dead Redis, and new images: all computed
            response = client.post("/v1/features", files=files(png(seed)), headers=AUTH)
            assert response.status_code == 200 and response.headers["x-deltavision-cache-hits"] == "0"
        torch.testing.assert_close(unpack(stored.content).features[4], service.gather(service.decode(png(21))[None])[4],
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        values = metric_values(client.get("/metrics").text)
        assert sample(values, "deltavision_cache_errors_total", cache="redis") >= 1
        assert sample(values, "deltavision_cache_reachable") == 0
        redis_process.start()  # same port, empty
        time.sleep(0.6)
        client.post("/v1/features", files=files(png(24)), headers=AUTH)
        again = client.post("/v1/features", files=files(png(24)), headers=AUTH)
        assert again.headers["x-deltavision-cache-hits"] == "1"  # stored in the new Redis
        assert client.get("/healthz").json()["status"] == "ok"
    finally:
        service.close()


def test_a_full_redis_refusing_writes_only_degrades(model, redis_process):
    service = make_service(model, cache_url=redis_process.url)
    server = redis.Redis.from_url(redis_process.url)
    server.config_set("maxmemory-policy", "noeviction")
    server.config_set("maxmemory", "1")  # every write is refused: OOM
    client = TestClient(create_app(service))
    try:
        for _ in range(2):
            response = client.post("/v1/features", files=files(png(31)), headers=AUTH)
            assert response.status_code == 200 and response.headers["x-deltavision-cache-hits"] == "0"
        assert server.dbsize() == 0
        stats = service.stats()["cache"]
        assert stats["errors"] >= 2 and stats["reachable"] == 1  # refused writes, reads still answered
    finally:
        service.close()


@pytest.mark.parametrize("url", ["memcached://127.0.0.1:11211", "127.0.0.1:6379", "redis-cache"])
def test_cache_urls_other_than_redis_are_refused(url):
    with pytest.raises(CacheURLError, match="--cache"):
        check_redis_url(url)


# --- the same requests against both engines -------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    path = tmp_path_factory.mktemp("scale") / "tiny-vit.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The service both engines should be: built in this process from the same checkpoint."""
    made = build_service(VIT, ServiceConfig(token=TOKEN), checkpoint=checkpoint, backbone_options=TINY_VIT, device="cpu")
    yield made
    made.close()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory):
    try:
        process = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    except RuntimeError as err:
        pytest.fail(str(err))
    yield process
    process.kill()


def serve_arguments(checkpoint: Path, cache: str) -> list[str]:
    options = [item for key, value in TINY_VIT.items() for item in ("--backbone-opt", f"{key}={value}")]
    return ["--backbone", VIT, "--checkpoint", str(checkpoint), *options, *LIMITS, "--threads", "1", "--cache", cache]


def start_service(arguments: list[str], folder: Path) -> ServiceProcess:
    env = {**os.environ, "DELTAVISION_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", **RAY_ON_A_SHARED_MACHINE}  # fmt: skip
    try:
        return ServiceProcess(arguments, folder, env)
    except RuntimeError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def uvicorn_service(checkpoint, shared_redis, tmp_path_factory):
    service = start_service(serve_arguments(checkpoint, shared_redis.url.replace("/0", "/1")),
                            tmp_path_factory.mktemp("uvicorn"))  # fmt: skip
    yield service
    service.stop()


@pytest.fixture(scope="module")
def ray_service(checkpoint, shared_redis, tmp_path_factory):
    """Two Ray Serve replicas (half a CPU each) sharing the Redis cache."""
    arguments = [*serve_arguments(checkpoint, shared_redis.url), "--engine", "ray", "--replicas", "2",
                 "--cpus-per-replica", "0.5"]  # fmt: skip
    service = start_service(arguments, tmp_path_factory.mktemp("ray"))
    yield service
    service.stop()


@pytest.fixture(params=["uvicorn", "ray"])
def engine(request) -> ServiceProcess:
    return request.getfixturevalue(f"{request.param}_service")


def shared_requests():
    """(id, method, path, keyword arguments, status, error code or None): the wire contract of both engines."""
    ok = files(png(5))
    return [
        ("health", "get", "/health", dict(headers={}), 200, None),
        ("info without token", "get", "/v1/info", dict(headers={}), 401, "unauthorized"),
        ("wrong token", "post", "/v1/features", dict(files=ok, headers={"Authorization": "Bearer nope"}), 401, "unauthorized"),
        ("unknown k", "post", "/v1/features?k=9", dict(files=ok), 400, "unknown_k"),
        ("unknown dtype", "post", "/v1/features?dtype=bfloat16", dict(files=ok), 400, "unknown_dtype"),
        ("json body", "post", "/v1/features", dict(json={"images": []}), 415, "unsupported_media_type"),
        ("not an image", "post", "/v1/features", dict(files=files(b"GIF89a but not really")), 422, "undecodable_image"),
        ("too many images", "post", "/v1/features", dict(files=files(*[png(i) for i in range(5)])), 413, "too_many_images"),
        ("body over the limit", "post", "/v1/features", dict(files=files(b"\0" * 250_000)), 413, "payload_too_large"),
        ("features by GET", "get", "/v1/features", dict(), 405, "http_405"),
        ("unknown path", "get", "/v2/anything", dict(), 404, "http_404"),
    ]


@pytest.mark.parametrize("case", shared_requests(), ids=lambda case: case[0])
def test_both_engines_answer_alike(engine, case):
    _, method, path, kwargs, status, code = case
    response = httpx.request(method.upper(), engine.url + path, **{"headers": AUTH, **kwargs}, timeout=30)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    if code is not None:
        assert response.json()["error"]["code"] == code
        assert set(response.json()["error"]) == {"code", "message"}
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


def test_both_engines_serve_the_reference_features_and_metrics(engine, reference):
    with httpx.Client(base_url=engine.url, headers=AUTH, timeout=30) as http:
        info = http.get("/v1/info").json()
        assert info["fingerprint"] == reference.fingerprint and info["limits"]["max_images"] == 4
        blobs = [png(41), png(42, size=(50, 20))]
        payload = unpack(http.post("/v1/features", params={"k": "all"}, files=files(*blobs)).content)
        expected = reference.gather(torch.stack([reference.decode(blob) for blob in blobs]))
        for k in reference.ks:
            torch.testing.assert_close(payload.features[k], expected[k], rtol=1e-4, atol=1e-4)
        quantized = unpack(http.post("/v1/features", params={"k": "2", "dtype": "int8"}, files=files(*blobs)).content)
        assert quantized.features[2].dtype == torch.int8 and quantized.metadata["fingerprint"] == reference.fingerprint
        health = http.get("/healthz").json()
        assert health["status"] == "ok" and health["cache"] == {"kind": "redis", "reachable": True}
        values = metric_values(http.get("/metrics").text)
    assert sample(values, "deltavision_cache_reachable", cache="redis") == 1
    assert sum(v for (name, _), v in values.items() if name == "deltavision_requests_total") >= 1


def test_serve_refuses_replica_options_without_ray_and_bad_bounds():
    from typer.testing import CliRunner

    from deltavision.mist import cli

    runner = CliRunner()
    base = ["serve", "--backbone", VIT, "--token", TOKEN]
    for extra, words in ((["--replicas", "2"], "--engine ray"), (["--engine", "spark"], "--engine must be"),
                         (["--engine", "ray", "--min-replicas", "3", "--max-replicas", "2"], "more than"),
                         (["--cache", "memcached://x"], "--cache must be")):  # fmt: skip
        result = runner.invoke(cli.app, base + extra)
        assert isinstance(result.exception, DeltaVisionError) and words in str(result.exception), extra


# --- faults under load: a replica killed, then Redis killed ---------------------------------------

CLIENTS, BATCH = 12, 4


@pytest.fixture(scope="module")
def digits120(tmp_path_factory) -> list:
    """120 real sklearn digits as PNG files (distinct bytes), as edge client items."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("fault") / "digits"
    write_image_folder(root, digits.images[:120], digits.target[:120], [str(c) for c in range(10)], split=False)
    return [image_item(0, path=path) for path in sorted(root.rglob("*.png"))]


class Interrupted(Exception):
    pass


def test_replica_and_redis_killed_under_load_lose_nothing(ray_service, shared_redis, reference, digits120, tmp_path):
    fingerprint = reference.fingerprint
    items = digits120
    assert len({item.digest for item in items}) == len(items)

    # One edge client is interrupted after 3 stored batches; it resumes under the load below.
    resumed_store = FeatureStore(tmp_path / "client-resumed", fingerprint)
    with FeatureClient(ray_service.url, TOKEN, retry_seconds=60) as client:
        def stop_after_three(done: int) -> None:
            if done == 3:
                raise Interrupted

        with pytest.raises(Interrupted):
            download_features(client, resumed_store, items, [4], "float16", batch_size=BATCH, progress=False,
                              on_shard=stop_after_three)  # fmt: skip
    digests = [item.digest for item in items]
    kept_before = set(digests) - set(resumed_store.missing(digests, [4], "float16"))
    assert len(kept_before) == 3 * BATCH

    statuses: dict[int, int] = {}
    fetched: dict[int, list[str]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def count(response: httpx.Response) -> None:
        if response.request.url.path == "/v1/features":
            with lock:
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    def edge_client(number: int) -> None:
        store = resumed_store if number == 0 else FeatureStore(tmp_path / f"client-{number}", fingerprint)
        rotated = items[number * 7 % len(items):] + items[: number * 7 % len(items)]
        try:
            with FeatureClient(ray_service.url, TOKEN, retry_seconds=60) as client:
                client.http.event_hooks["response"] = [count]
                features = client.features

                def recording(images, ks, dtype):
                    payload = features(images, ks, dtype)
                    with lock:
                        fetched.setdefault(number, []).extend(payload.digests)
                    return payload

                client.features = recording
                download_features(client, store, rotated, [4], "float16", batch_size=BATCH, progress=False)
        except BaseException as err:  # reported below
            errors.append(err)

    before = ray_service.replica_pids()
    assert len(before) == 2
    threads = [threading.Thread(target=edge_client, args=(number,), daemon=True) for number in range(CLIENTS)]
    for thread in threads:
        thread.start()
    total = CLIENTS * len(items) // BATCH

    def answered() -> int:
        return statuses.get(200, 0)

    _wait_for(lambda: answered() >= total * 0.25, 120)
    os.kill(before[0], signal.SIGKILL)  # a replica dies mid-load
    killed_at = answered()
    _wait_for(lambda: answered() >= total * 0.6, 120)
    try:
        shared_redis.kill()  # and then the shared cache
        redis_killed_at = answered()
        for thread in threads:
            thread.join(180)
    finally:
        shared_redis.start()
    assert not errors, errors[:3]
    assert killed_at < total and redis_killed_at < total  # both faults hit while requests were still coming

    wrong = lost = 0
    expected = {}
    for start in range(0, len(items), 30):
        chunk = items[start:start + 30]
        gathered = reference.gather(torch.stack([reference.decode(item.read()) for item in chunk]), [4])[4]
        expected.update({item.digest: gathered[row] for row, item in enumerate(chunk)})
    for number in range(CLIENTS):
        store = FeatureStore(tmp_path / ("client-resumed" if number == 0 else f"client-{number}"), fingerprint)
        missing = store.missing(digests, [4], "float16")
        lost += len(missing)
        present = [d for d in digests if d not in missing]
        values = store.read(4, "float16", present)
        for digest, row in zip(present, values):
            wrong += not torch.allclose(row, expected[digest], rtol=1e-2, atol=1e-2)
    assert (lost, wrong) == (0, 0)
    assert set(fetched[0]).isdisjoint(kept_before) and len(fetched[0]) == len(items) - len(kept_before)

    _wait_for(lambda: len(ray_service.replica_pids()) == 2 and before[0] not in ray_service.replica_pids(), 90)
    restarted = set(ray_service.replica_pids()) - set(before)
    print(f"fault test: {sum(statuses.values())} feature requests ({statuses}), lost {lost}, wrong {wrong}, "
          f"replicas restarted {len(restarted)}")  # fmt: skip
    assert len(restarted) == 1


def _wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {seconds} s"
        time.sleep(0.05)


@pytest.mark.parametrize("first, retried", [((500, "text/plain", b"Internal Server Error"), True),
                                            ((500, "application/json", b'{"error": {"code": "internal_error", "message": "x"}}'), False),
                                            ((503, "text/plain", b"no replica"), True)])  # fmt: skip
def test_client_retries_a_500_only_when_it_is_not_the_services_own_error(first, retried):
    """Ray's proxy answers a plain 500 for requests a dying replica held: sent again; the service's JSON 500 is not."""
    from deltavision.mist.edge.client import ServiceError

    answers = [httpx.Response(first[0], headers={"content-type": first[1]}, content=first[2]),
               httpx.Response(200, json={"backbone": VIT})]  # fmt: skip
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return answers[len(sent) - 1]

    client = FeatureClient("http://service", TOKEN, transport=httpx.MockTransport(handler), sleep=lambda _: None)
    if retried:
        assert client.info() == {"backbone": VIT} and len(sent) == 2
    else:
        with pytest.raises(ServiceError, match="500"):
            client.info()
        assert len(sent) == 1


def test_replica_options_become_ray_serve_deployment_options():
    from deltavision.mist.server.ray_engine import Scaling

    fixed = Scaling(replicas=2, gpus_per_replica=0.5).deployment_options()
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    scaled = Scaling(replicas=2, min_replicas=1, max_replicas=4).deployment_options()
    assert "num_replicas" not in scaled
    bounds = {key: scaled["autoscaling_config"][key] for key in ("min_replicas", "max_replicas", "initial_replicas")}
    assert bounds == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2}
