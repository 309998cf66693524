"""Separated tuning (MIST): a feature service beside the backbone, an edge network away from it.

Server side (needs timm and the backbone): :mod:`.gather` computes Gather_k
(Sec. 3.2), :mod:`.service` serves it over HTTP with micro-batching
(:mod:`.batcher`) and a content-addressed LRU (:mod:`.cache`).

Edge side (needs neither timm nor backbone weights): :mod:`.edge` is the
low-rank attention edge network (Sec. 3.3), :mod:`.fit` trains and evaluates
it on received features, :mod:`.store` keeps them on disk, :mod:`.client`
talks to the service. :mod:`.wire` is the format both sides share.

This ``__init__`` imports nothing, and no edge module imports timm or a
server-side module (tests/test_mist_edge.py runs edge training where importing
timm fails). Note that ``import deltavision`` itself currently loads timm,
through the model API its ``__init__`` re-exports.
"""
