"""onnxmpq: post-training mixed-precision quantization of ONNX models.

Public API (the CLI's jobs as functions): `load`, `quantize`, `evaluate`, `inspect`, `compare`, and
the types exchanged between the pipeline stages.
"""

__version__ = "0.1.0"

from onnxmpq.errors import ConstraintError, InternalError, OnnxmpqError
from onnxmpq.pipeline.api import assign, compare, evaluate, inspect, load, quantize, read_allocation
from onnxmpq.types import ActRange, Candidate, LayerSpec, QuantOptions, WeightRange

__all__ = ["ActRange", "Candidate", "ConstraintError", "InternalError", "LayerSpec", "OnnxmpqError",
           "QuantOptions", "WeightRange", "__version__", "assign", "compare", "evaluate", "inspect", "load",
           "quantize", "read_allocation"]
