"""flash_ext in other libraries (each an optional dependency, imported on use)."""
