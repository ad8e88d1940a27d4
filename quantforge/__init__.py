"""quantforge: calibrate, plan, quantize, train, merge, evaluate and publish causal LMs.

Importing this package does no heavy work (no torch, no triton): stages import lazily.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
