"""flash_ext: FlashAttention for PyTorch, as a CUDA C++ extension."""

from .interface import attention

__all__ = ["attention"]
__version__ = "0.1.0"
