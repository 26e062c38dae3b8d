"""flash_ext: FlashAttention for PyTorch, as a CUDA C++ extension."""

from . import torch_registry
from .interface import attention
from .sdpa import route_sdpa, scaled_dot_product_attention

torch_registry.register()  # torch's flash attention registry, where it has one: not activated

__all__ = ["attention", "route_sdpa", "scaled_dot_product_attention"]
__version__ = "0.1.0"
