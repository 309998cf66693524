"""Task heads over an adapted backbone: multi-scale features (:mod:`.features`), semantic
segmentation (:mod:`.segmentation`) and its metrics (:mod:`.metrics`, no timm)."""
