"""Separated tuning (MIST): a feature service beside the backbone, an edge network away from it.

Server side (needs timm and the backbone), :mod:`.server`: :mod:`.server.gather`
computes Gather_k (Sec. 3.2), :mod:`.server.service` decodes images and answers
feature requests with micro-batching (:mod:`.server.batcher`) and a
content-addressed cache (:mod:`.server.cache`); :mod:`.server.app` is its HTTP
face (FastAPI).

Edge side (needs neither timm nor backbone weights), :mod:`.edge`:
:mod:`.edge.network` is the low-rank attention edge network (Sec. 3.3),
:mod:`.edge.fit` trains and evaluates it on received features, :mod:`.edge.store`
keeps them on disk, :mod:`.edge.client` talks to the service and
:mod:`.edge.commands` runs fit/eval/predict. :mod:`.wire` is the format both
sides share; :mod:`.cli` holds the command lines.

This ``__init__`` imports nothing eagerly (``Gather`` is loaded on first use),
and no edge module imports timm or a server module (tests/test_mist_edge.py and
tests/test_mist_live.py run edge training, classification and segmentation, where
importing timm fails). ``import deltavision`` loads its model API lazily, so it
does not load timm either.

Segmentation (the paper's appendix Sec. 8) uses the same service; the edge adds
:mod:`.edge.masks` (masks kept beside the features), a decoder in
:mod:`.edge.network` and :mod:`.edge.segmentation_commands` (its fit, eval and
predict, which :mod:`.edge.commands` dispatches to).
"""

__all__ = ["Gather"]


def __getattr__(name: str):
    if name == "Gather":
        from .server.gather import Gather

        return Gather
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
