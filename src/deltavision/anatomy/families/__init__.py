"""The timm families deltavision knows, one module each; importing this package registers them."""

from . import convnext, efficientnet, resnet, swin, vit  # noqa: F401
