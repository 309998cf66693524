"""The feature service through its ASGI app: auth, limits, bad input (always 4xx JSON), caching."""

import io
import json
import socket
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
import timm
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from deltavision.errors import DeltaVisionError
from deltavision.mist.edge import client as edge_client, commands
from deltavision.mist.edge.client import FeatureClient
from deltavision.mist.edge.network import EdgeConfig, EdgeNetwork, save_edge
from deltavision.mist.server.app import create_app, server_config
from deltavision.mist.server.service import FeatureService, ServiceConfig
from deltavision.mist.wire import unpack

TOKEN = "s3cret-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
LIMITS = dict(max_body_bytes=200_000, max_images=4, max_pixels=512 * 512, max_request_pixels=400_000)


def png(seed: int = 0, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def blank_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb's shape)."""
    data = bytearray(png(size=(1, 1), mode="L"))
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def files(*blobs: bytes, field: str = "images"):
    return [(field, (f"{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY_VIT).eval()


@pytest.fixture(scope="module")
def service(model):
    made = FeatureService(
        model, backbone="vit_small_patch16_224", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
        config=ServiceConfig(token=TOKEN, max_wait_ms=2.0, **LIMITS), backbone_options=TINY_VIT,
    )  # fmt: skip
    yield made
    made.close()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service), raise_server_exceptions=False)


def test_health_needs_no_token_and_info_does(client):
    assert client.get("/health").json() == {"status": "ok"}
    refused = client.get("/v1/info")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    info = client.get("/v1/info", headers=AUTH).json()
    assert info["backbone"] == "vit_small_patch16_224" and info["family"] == "vit"
    assert info["feature_shape"] == [17, 32] and info["grid"] == [4, 4] and info["num_prefix_tokens"] == 1
    assert info["ks"] == [1, 2, 3, 4] and info["default_k"] == 4
    assert info["dtypes"] == ["float32", "float16", "int8"]
    assert info["image_size"] == 32 and info["mean"] == [0.5] * 3 and info["std"] == [0.5] * 3
    assert info["tensor_bytes_per_image"] == {"float32": 17 * 32 * 4, "float16": 17 * 32 * 2, "int8": 17 * 32 + 4}
    assert info["limits"]["max_images"] == 4 and len(info["fingerprint"]) == 32


@pytest.mark.parametrize("token", ["", "short", "fifteen-chars!!"])
def test_service_refuses_a_missing_or_short_token(model, token):
    with pytest.raises(DeltaVisionError, match="token"):
        FeatureService(model, backbone="x", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, config=ServiceConfig(token=token))


def test_features_match_gather_on_the_same_pixels(client, service):
    blobs = [png(1), png(2, size=(64, 20))]
    response = client.post("/v1/features", params={"k": "all"}, files=files(*blobs), headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    payload = unpack(response.content)
    assert payload.ks == [1, 2, 3, 4] and payload.dtype == "float32"
    assert payload.metadata["fingerprint"] == service.fingerprint
    pixels = torch.stack([service.decode(blob) for blob in blobs])
    expected = service.gather(pixels)
    for k in payload.ks:
        torch.testing.assert_close(payload.features[k], expected[k], rtol=1e-5, atol=1e-5)


def test_dtypes_and_default_k(client):
    blobs = [png(3), png(4)]
    reference = unpack(client.post("/v1/features", files=files(*blobs), headers=AUTH).content)
    assert reference.ks == [4]
    half = unpack(client.post("/v1/features?k=4&dtype=float16", files=files(*blobs), headers=AUTH).content)
    assert half.features[4].dtype == torch.float16
    torch.testing.assert_close(half.as_float32(4), reference.features[4], rtol=1e-2, atol=1e-2)
    quantized = unpack(client.post("/v1/features?k=4&dtype=int8", files=files(*blobs), headers=AUTH).content)
    assert quantized.features[4].dtype == torch.int8 and quantized.scales[4].shape == (2,)
    error = (quantized.as_float32(4) - reference.features[4]).abs().flatten(1).amax(1)
    assert (error <= quantized.scales[4] / 2 + 1e-6).all()


def test_an_image_is_computed_once_however_often_it_is_sent(client, service):
    blob = png(99)
    before = service.stats()["batching"]["images_computed"]
    first = client.post("/v1/features?k=2", files=files(blob, blob), headers=AUTH)
    again = client.post("/v1/features?k=1,3&dtype=int8", files=files(blob), headers=AUTH)
    assert first.headers["x-deltavision-cache-hits"] == "0" and again.headers["x-deltavision-cache-hits"] == "1"
    assert service.stats()["batching"]["images_computed"] - before == 1
    payload = unpack(first.content)
    torch.testing.assert_close(payload.features[2][0], payload.features[2][1])


def bad_requests():
    """(id, method, url, keyword arguments, expected status, expected error code)."""
    ok = files(png(5))
    return [
        ("no token", "post", "/v1/features", dict(files=ok, headers={}), 401, "unauthorized"),
        ("wrong token", "post", "/v1/features", dict(files=ok, headers={"Authorization": "Bearer nope"}), 401, "unauthorized"),
        ("token prefix", "post", "/v1/features",
         dict(files=ok, headers={"Authorization": f"Bearer {TOKEN[:-1]}"}), 401, "unauthorized"),
        ("token plus suffix", "post", "/v1/features",
         dict(files=ok, headers={"Authorization": f"Bearer {TOKEN}x"}), 401, "unauthorized"),
        ("empty bearer", "post", "/v1/features", dict(files=ok, headers={"Authorization": "Bearer "}), 401, "unauthorized"),
        ("basic auth", "post", "/v1/features", dict(files=ok, headers={"Authorization": f"Basic {TOKEN}"}), 401, "unauthorized"),
        ("stats without token", "get", "/v1/stats", dict(headers={}), 401, "unauthorized"),
        ("k too large", "post", "/v1/features?k=5", dict(files=ok), 400, "unknown_k"),
        ("k zero", "post", "/v1/features?k=0", dict(files=ok), 400, "unknown_k"),
        ("k not a number", "post", "/v1/features?k=abc", dict(files=ok), 400, "unknown_k"),
        ("k list with bad value", "post", "/v1/features?k=1,9", dict(files=ok), 400, "unknown_k"),
        ("unknown dtype", "post", "/v1/features?dtype=bfloat16", dict(files=ok), 400, "unknown_dtype"),
        ("json body", "post", "/v1/features", dict(json={"images": []}), 415, "unsupported_media_type"),
        ("raw bytes", "post", "/v1/features", dict(content=png(5), headers={**AUTH, "Content-Type": "image/png"}), 415, "unsupported_media_type"),
        ("multipart without boundary", "post", "/v1/features",
         dict(content=b"abc", headers={**AUTH, "Content-Type": "multipart/form-data"}), 400, "bad_multipart"),
        ("multipart garbage", "post", "/v1/features",
         dict(content=b"not multipart", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"}), 400, "bad_multipart"),
        ("empty multipart", "post", "/v1/features",
         dict(content=b"--xyz--\r\n", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"}), 400, "no_images"),
        ("files under another field", "post", "/v1/features", dict(files=files(png(5), field="photos")), 400, "no_images"),
        ("text field instead of file", "post", "/v1/features", dict(data={"images": "cat.png"}), 415, "unsupported_media_type"),
        ("text field in multipart", "post", "/v1/features",
         dict(data={"images": "cat.png"}, files=[("other", ("x", b"x", "text/plain"))]), 400, "no_images"),
        ("empty file", "post", "/v1/features", dict(files=files(b"")), 422, "undecodable_image"),
        ("not an image", "post", "/v1/features", dict(files=files(b"GIF89a but not really")), 422, "undecodable_image"),
        ("truncated png", "post", "/v1/features", dict(files=files(png(6)[:60])), 422, "undecodable_image"),
        ("one bad among good", "post", "/v1/features", dict(files=files(png(7), b"\x89PNG\r\n\x1a\n")), 422, "undecodable_image"),
        ("too many pixels", "post", "/v1/features", dict(files=files(blank_png(600, 600))), 413, "image_too_large"),
        ("decompression bomb header", "post", "/v1/features", dict(files=files(png_claiming_size(60000, 60000))), 413, "image_too_large"),
        ("plausible huge header", "post", "/v1/features", dict(files=files(png_claiming_size(3000, 3000))), 413, "image_too_large"),
        ("too many images", "post", "/v1/features", dict(files=files(*[png(i) for i in range(5)])), 413, "too_many_images"),
        ("far too many images", "post", "/v1/features", dict(files=files(*[png(i) for i in range(12)])), 413, "too_many_images"),
        ("over the request pixel budget", "post", "/v1/features",
         dict(files=files(blank_png(400, 400), blank_png(400, 401), blank_png(300, 300))), 413, "request_too_large"),
        ("body over the limit", "post", "/v1/features", dict(files=files(b"\0" * 250_000)), 413, "payload_too_large"),
        ("chunked body over the limit", "post", "/v1/features",
         dict(content=iter([b"-" * 100_000] * 3), headers={**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"}),
         413, "payload_too_large"),
        ("features by GET", "get", "/v1/features", dict(), 405, "http_405"),
        ("unknown path", "get", "/v2/anything", dict(), 404, "http_404"),
    ]


@pytest.mark.parametrize("case", bad_requests(), ids=lambda case: case[0])
def test_bad_requests_get_4xx_json_never_5xx(client, service, case):
    _, method, url, kwargs, status, code = case
    kwargs = {"headers": AUTH, **kwargs}
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == code
    assert client.get("/health").status_code == 200  # and the service lives on


def test_a_full_queue_answers_429_with_retry_after(model):
    busy = FeatureService(
        model, backbone="vit_small_patch16_224", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
        config=ServiceConfig(token=TOKEN, max_pending=0),
    )  # fmt: skip
    try:
        response = TestClient(create_app(busy)).post("/v1/features", files=files(png(11)), headers=AUTH)
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "busy"
    finally:
        busy.close()


def test_identical_requests_get_identical_bytes(client):
    blobs = [png(21), png(22, size=(33, 17))]
    for params in ({"k": "all"}, {"k": "1,3", "dtype": "int8"}, {"dtype": "float16"}):
        answers = {client.post("/v1/features", params=params, files=files(*blobs), headers=AUTH).content for _ in range(4)}
        assert len(answers) == 1, params


@pytest.mark.parametrize("broken", [b"\x89PNG\r\n\x1a\n", png(6)[:60]], ids=["no header", "header, truncated pixels"])
def test_undecodable_image_error_names_its_index_and_filename(client, broken):
    sent = [("images", ("good.png", png(7), "image/png")), ("images", ("broken.png", broken, "image/png"))]
    response = client.post("/v1/features", files=sent, headers=AUTH)
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "image 1" in message and "broken.png" in message


def test_pixel_budget_is_checked_from_headers_before_any_decoding(client, service, monkeypatch):
    decoded = []
    monkeypatch.setattr(service, "_decode", lambda data, label: decoded.append(label))
    response = client.post("/v1/features", files=files(png(30), blank_png(500, 500), blank_png(500, 499)), headers=AUTH)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert decoded == []


# --- a real HTTP server on loopback (uvicorn + our h11 protocol) ---------------------------------------

HEADER_TIMEOUT, BODY_TIMEOUT = 1.0, 1.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def live_port(model):
    """Port of a uvicorn server in a thread, serving a service with 1 s header and body deadlines."""
    served = FeatureService(
        model, backbone="vit_small_patch16_224", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
        config=ServiceConfig(token=TOKEN, body_timeout=BODY_TIMEOUT, **LIMITS), backbone_options=TINY_VIT,
    )  # fmt: skip
    port = free_port()
    server = uvicorn.Server(server_config(served, "127.0.0.1", port, header_timeout=HEADER_TIMEOUT, keep_alive_timeout=2.0))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield port
    server.should_exit = True
    thread.join(10)
    served.close()


def exchange(port: int, data: bytes, wait: float = 5.0, pause_after: bytes = b"") -> tuple[bytes, float]:
    """Send ``data`` (then ``pause_after`` never completed), read until the server closes or ``wait`` ends.

    Returns (everything received, seconds until the server closed or ``wait`` ended)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data + pause_after)
        received = b""
        sock.settimeout(0.2)
        while time.monotonic() - started < wait:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received, time.monotonic() - started


def json_error(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/features HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/features HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000,
    ],
    ids=["garbage request line", "non-numeric content-length", "conflicting content-lengths", "unfinished 20 kB header"],
)
def test_malformed_http_gets_the_json_error_body(live_port, request_bytes):
    raw, _ = exchange(live_port, request_bytes)
    status, headers, body = json_error(raw)
    assert status == 400 and headers["content-type"] == "application/json"
    assert body["error"]["code"] == "bad_http_request"


def test_slow_headers_are_cut_off_while_others_are_served(live_port):
    """A client trickling its headers is disconnected after the header deadline; /health answers meanwhile."""
    results = {}
    slow = threading.Thread(
        target=lambda: results.update(slow=exchange(live_port, b"GET /health HTTP/1.1\r\nHost: x\r\n", wait=10.0)),
        daemon=True,
    )
    slow.start()
    time.sleep(0.2)
    with httpx.Client(base_url=f"http://127.0.0.1:{live_port}", timeout=5) as http:
        assert http.get("/health").status_code == 200
    slow.join(15)
    received, seconds = results["slow"]
    assert received == b"" and HEADER_TIMEOUT * 0.8 <= seconds < HEADER_TIMEOUT + 4


def test_a_stalled_body_gets_408_json_after_the_body_deadline(live_port):
    head = (f"POST /v1/features HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 5000\r\n\r\n").encode()  # fmt: skip
    raw, seconds = exchange(live_port, head, wait=10.0, pause_after=b"--xyz\r\n")
    status, headers, body = json_error(raw)
    assert status == 408 and body["error"]["code"] == "body_timeout"
    assert seconds < BODY_TIMEOUT + 4  # answered and closed, not left hanging


# --- the edge refuses a service computing other features ----------------------------------------------


def connect_to(service_app):
    """A FeatureClient factory whose HTTP goes to ``service_app`` in-process."""

    def make(url, token, **options):
        client = FeatureClient(url, token, **options)
        client.http.close()
        client.http = TestClient(service_app, base_url=url, headers={"Authorization": f"Bearer {token}"})
        return client

    return make


def other_service(seed: int = 0, mean: float = 0.5) -> FeatureService:
    torch.manual_seed(seed)
    weights = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY_VIT).eval()
    return FeatureService(
        weights, backbone="vit_small_patch16_224", image_size=32, mean=(mean,) * 3, std=(0.5,) * 3,
        config=ServiceConfig(token=TOKEN), backbone_options=TINY_VIT,
    )  # fmt: skip


@pytest.mark.parametrize("difference", ["same service", "other weights", "other normalisation"])
def test_edge_eval_and_predict_refuse_a_service_with_other_features(service, tmp_path, monkeypatch, difference):
    config = EdgeConfig(tokens=17, width=32, classes=["a", "b"], k=4, backbone=service.backbone,
                        fingerprint=service.fingerprint)  # fmt: skip
    save_edge(EdgeNetwork(config), tmp_path / "edge")
    image = tmp_path / "cat.png"
    image.write_bytes(png(40))
    serving = {"same service": lambda: service, "other weights": lambda: other_service(seed=1),
               "other normalisation": lambda: other_service(mean=0.4)}[difference]()  # fmt: skip
    monkeypatch.setattr(edge_client, "FeatureClient", connect_to(create_app(serving)))
    try:
        if difference == "same service":
            rows = commands.predict_files(tmp_path / "edge", [image], server="http://testserver", token=TOKEN)
            assert len(rows) == 1 and rows[0]["label"] in ("a", "b")
            return
        with pytest.raises(DeltaVisionError, match="computes other features"):
            commands.predict_files(tmp_path / "edge", [image], server="http://testserver", token=TOKEN)
        with pytest.raises(DeltaVisionError, match="computes other features"):
            commands.evaluate_saved_edge(tmp_path / "edge", server="http://testserver", token=TOKEN, data="unused")
    finally:
        if serving is not service:
            serving.close()


# --- the serve command: tokens, TLS, exposure warnings ------------------------------------------------


@pytest.fixture()
def serve_cli(model, monkeypatch):
    """Run `serve` with the tiny model and without listening: returns (invoke, what serve() was given)."""
    from typer.testing import CliRunner

    from deltavision.mist import cli
    from deltavision.mist.server import app as app_module
    from deltavision.mist.server import service as service_module

    served = {}

    def build(backbone, config, **options):
        served["config"] = config
        return FeatureService(model, backbone=backbone, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, config=config)

    monkeypatch.setattr(service_module, "build_service", build)
    monkeypatch.setattr(app_module, "serve", lambda service, host, port, **options: served.update(options, host=host))
    monkeypatch.delenv("DELTAVISION_TOKEN", raising=False)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli.app, ["serve", "--backbone", "vit_small_patch16_224", *map(str, args)])

    return invoke, served


def test_serve_generates_and_prints_a_token_when_none_is_given(serve_cli):
    invoke, served = serve_cli
    result = invoke()
    assert result.exit_code == 0, result.output
    token = served["config"].token
    assert len(token) >= 16 and token in result.output and "warning" not in result.output


def test_serve_refuses_a_short_token(serve_cli):
    invoke, served = serve_cli
    result = invoke("--token", "abc")
    assert isinstance(result.exception, DeltaVisionError) and "at least 16" in str(result.exception)
    assert "config" not in served  # refused before the backbone is built


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                          ("0.0.0.0", True), ("192.168.1.20", True), ("edge-server.lan", True)])  # fmt: skip
def test_serve_warns_on_a_non_loopback_host_without_tls(serve_cli, host, warned):
    invoke, _ = serve_cli
    result = invoke("--token", TOKEN, "--host", host)
    assert result.exit_code == 0, result.output
    assert ("unencrypted" in result.output) is warned


def test_serve_passes_tls_files_and_needs_both(serve_cli, tmp_path):
    invoke, served = serve_cli
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_text("k"), cert.write_text("c")
    result = invoke("--token", TOKEN, "--host", "0.0.0.0", "--ssl-keyfile", key, "--ssl-certfile", cert)
    assert result.exit_code == 0 and "unencrypted" not in result.output and "https://" in result.output
    assert (served["ssl_keyfile"], served["ssl_certfile"]) == (str(key), str(cert))
    half = invoke("--token", TOKEN, "--ssl-keyfile", key)
    assert isinstance(half.exception, DeltaVisionError) and "both" in str(half.exception)


def test_tls_serves_https_on_loopback(service, tmp_path):
    """A self-signed certificate made by openssl (installed by README's set-up command and .ci/run)."""
    import ssl
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    port = free_port()
    server = uvicorn.Server(server_config(service, "127.0.0.1", port, ssl_keyfile=str(key), ssl_certfile=str(cert)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=10) as https:
            assert https.get(f"https://127.0.0.1:{port}/v1/info", headers=AUTH).json()["fingerprint"] == service.fingerprint
    finally:
        server.should_exit = True
        thread.join(10)
