"""The feature service through its ASGI app: auth, limits, bad input (always 4xx JSON), caching."""

import io
import struct
import zlib

import numpy as np
import pytest
import timm
import torch
from fastapi.testclient import TestClient
from PIL import Image

from deltavision.errors import DeltaVisionError
from deltavision.mist.server.app import create_app
from deltavision.mist.server.service import FeatureService, ServiceConfig
from deltavision.mist.wire import unpack

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
LIMITS = dict(max_body_bytes=200_000, max_images=4, max_pixels=512 * 512)


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


def test_service_refuses_to_start_without_a_token(model):
    with pytest.raises(DeltaVisionError, match="token"):
        FeatureService(model, backbone="x", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, config=ServiceConfig(token=""))


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
