"""The feature service's side of MIST: needs timm and the backbone (never imported by the edge)."""
