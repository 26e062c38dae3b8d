"""flash_ext: FlashAttention for PyTorch, as a CUDA C++ extension."""

from .interface import attention
from .sdpa import route_sdpa, scaled_dot_product_attention

__all__ = ["attention", "route_sdpa", "scaled_dot_product_attention"]
__version__ = "0.1.0"
