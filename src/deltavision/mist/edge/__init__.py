"""The edge's side of MIST: imports torch, safetensors and httpx, never timm nor a server module."""
