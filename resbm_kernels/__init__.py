"""resbm_kernels: fused kernels and a pipeline runtime for ResBM (Residual
Bottleneck Models) activation compression at pipeline-stage boundaries.

    from resbm_kernels import Codec, ResBMBoundary, ops
"""

from . import ops
from .backends import use_backend
from .codec import BF16, GRAD_INT8, INT2, INT4, INT8, Codec
from .nn import ResBMBoundary, ResBMDecoder, ResBMEncoder

__version__ = "0.1.0"
__all__ = [
    "ops", "use_backend", "Codec", "BF16", "INT8", "INT4", "INT2", "GRAD_INT8",
    "ResBMBoundary", "ResBMEncoder", "ResBMDecoder", "__version__",
]
