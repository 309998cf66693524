"""``deltavision plan``: memory predicted from two small probes matches a direct measurement; times never negative.

The accuracy check measures memory, never time (time is not stable on a shared
machine). Configuration: a small ViT (6 blocks, width 192, patch 8) at 96 px,
145 tokens, full fine-tuning: activations kept for backward grow linearly in
the batch and outweigh weights, gradients and AdamW state at batch 16.
"""

from __future__ import annotations

import pytest

from deltavision.plan import Probe, measure_fresh, predict

MIB = 2**20
SMALL_VIT = {"img_size": 96, "patch_size": 8, "depth": 6}


def _measure(batch: int) -> Probe:
    return measure_fresh(backbone="vit_tiny_patch16_224", method="full", image_size=96, batch=batch,
                         steps=1, backbone_options=SMALL_VIT)


@pytest.mark.slow
def test_predicted_memory_matches_direct_measurement():
    small, large, direct = _measure(4), _measure(8), _measure(16)
    predicted = predict("full", small, large, 16, None).memory_bytes
    print(f"probes {small.memory_bytes / MIB:.1f} / {large.memory_bytes / MIB:.1f} MiB at 4 / 8; "
          f"batch 16 predicted {predicted / MIB:.1f} MiB, measured {direct.memory_bytes / MIB:.1f} MiB")
    # activation memory dominates at 16: the batch-dependent part is most of the total
    assert direct.memory_bytes - small.memory_bytes > 0.5 * direct.memory_bytes
    assert abs(predicted - direct.memory_bytes) <= 0.15 * direct.memory_bytes


def test_step_time_never_negative_when_the_probes_are_noisy():
    small, large = Probe(4, 100 * MIB, 1.2), Probe(8, 150 * MIB, 0.4)  # noise: the larger batch came out faster
    for batch in (1, 8, 16, 64, 1024):  # a line through them would reach -198 s at 1024
        assert predict("m", small, large, batch, None).step_seconds == pytest.approx(0.4 / 8 * batch)
    flat = predict("m", Probe(4, 1, 0.5), Probe(8, 2, 0.5), 32, None)
    assert flat.step_seconds == pytest.approx(0.5 / 8 * 32)
    steep = predict("m", Probe(4, 1, 1.0), Probe(8, 2, 3.0), 1, None)  # the line gives -0.5 s at batch 1
    assert steep.step_seconds == 0.0


def test_consistent_probes_extrapolate_linearly():
    small, large = Probe(4, 100 * MIB, 0.4), Probe(8, 150 * MIB, 0.7)
    row = predict("m", small, large, 16, 400 * MIB)
    assert row.memory_bytes == pytest.approx(250 * MIB)
    assert row.step_seconds == pytest.approx(1.3)
    assert row.fits and row.max_batch == 28
