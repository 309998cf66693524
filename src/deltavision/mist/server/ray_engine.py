"""``serve --engine ray``: the same FastAPI app (:func:`.app.create_app`) as a Ray Serve ingress deployment.

Each replica is a Ray actor that builds its own :class:`.service.FeatureService`
(backbone, micro-batcher, cache) and serves :func:`.app.create_app` of it, so
routes, authentication, limits, the wire format and the JSON errors are the very
code the single-process engine runs. Ray's HTTP proxy spreads requests over the
replicas, restarts a replica that dies, and (with ``min_replicas < max_replicas``)
adds or removes replicas with the load. Ray calls :meth:`FeatureReplica.check_health`
(the same test as ``GET /healthz``) to find a broken replica.

Batching stays the service's :class:`.batcher.MicroBatcher`, inside each replica:
``@serve.batch`` would batch calls of one method per replica just the same, but
the micro-batcher also shares one pass between concurrent requests for the same
image and keeps the cache's first-answer-wins guarantee, which ``@serve.batch``
does not know about. What Ray adds is the layer above: many replicas.

Differences from the single-process engine, all below the application: Ray's
proxy (uvicorn) parses HTTP, so a request it cannot parse is answered by the
proxy, not with the ``bad_http_request`` JSON, and ``--header-timeout`` does not
apply; a replica that dies mid-request gives the client a 500 without the
service's JSON body, which :class:`..edge.client.FeatureClient` retries.
With several replicas, give them a shared cache (``--cache redis://...``):
each replica's in-process LRU only knows what that replica computed.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from .app import create_app
from .service import ServiceConfig, build_service

APP_NAME = "deltavision"


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica needs to build the same service (sent to the replicas by Ray)."""

    backbone: str
    config: ServiceConfig
    checkpoint: str | None = None
    pretrained: bool = True
    image_size: int | None = None
    backbone_options: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    precision: str = "fp32"
    threads: int | None = None


@dataclass(frozen=True)
class Scaling:
    """How many replicas, with what resources: fixed ``replicas``, or autoscaling between bounds."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_ongoing_requests: int = 64

    def deployment_options(self) -> dict[str, Any]:
        """Options of ``serve.deployment`` for this scaling."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests,
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 30.0,
        }
        if self.min_replicas is None and self.max_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            low = self.min_replicas if self.min_replicas is not None else 1
            high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
            options["autoscaling_config"] = {
                "min_replicas": low, "max_replicas": high, "initial_replicas": min(max(self.replicas, low), high),
                "target_ongoing_requests": max(1, self.max_ongoing_requests // 4),
            }  # fmt: skip
        return options


class FeatureReplica:
    """One Ray Serve replica: a feature service and its FastAPI app."""

    def __init__(self, spec: ReplicaSpec):
        from ...memory import release_large_blocks

        if spec.threads:
            import torch

            torch.set_num_threads(spec.threads)
        release_large_blocks()  # as the uvicorn engine does: decoded images go back to the system when freed
        self.service = build_service(
            spec.backbone, spec.config, checkpoint=spec.checkpoint, pretrained=spec.pretrained,
            image_size=spec.image_size, backbone_options=spec.backbone_options or None, device=spec.device,
            precision=spec.precision, replica=_replica_id(),
        )  # fmt: skip

    def __serve_build_asgi_app__(self):
        return create_app(self.service)

    def check_health(self) -> None:
        """Raise (Ray then replaces this replica) when the service can no longer answer."""
        able, details = self.service.health()
        if not able:
            raise RuntimeError(f"feature service unhealthy: {details}")


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (never in service)
        return str(os.getpid())


def application(spec: ReplicaSpec, scaling: Scaling):
    """The bound Ray Serve application: :class:`FeatureReplica` as an ingress deployment."""
    ingress = serve.ingress()(FeatureReplica)
    deployment = serve.deployment(ingress, name="FeatureReplica", **scaling.deployment_options())
    return deployment.bind(spec)


def run(spec: ReplicaSpec, scaling: Scaling, host: str, port: int, *, keep_alive_timeout: float = 5.0,
        ssl_keyfile: str | None = None, ssl_certfile: str | None = None, on_ready=None) -> None:  # fmt: skip
    """Start (or join, with RAY_ADDRESS) a Ray cluster, deploy the service and serve until interrupted."""
    import ray

    signal.signal(signal.SIGTERM, _interrupt)  # stop cleanly on SIGTERM as on Ctrl-C
    ray.init(include_dashboard=False)  # a local cluster's workers inherit this environment
    try:
        http = {"host": host, "port": port, "keep_alive_timeout_s": max(1, round(keep_alive_timeout))}
        if ssl_keyfile and ssl_certfile:
            http.update(ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile)
        serve.start(http_options=http)
        serve.run(application(spec, scaling), name=APP_NAME, route_prefix="/")
        if on_ready is not None:
            on_ready()
        signal.pause() if hasattr(signal, "pause") else _wait_forever()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _wait_forever() -> None:
    import threading

    threading.Event().wait()
