"""layerstream: run PyTorch models whose weights stream from disk under a hard memory budget."""
from .budget import parse_budget, parse_bytes
from .errors import (BudgetError, ChecksumError, ClosedError, LayerstreamError, MetaBufferError, ModelError,
                     ReadError, WeightMismatch)
from .eager import load_eager
from .format import CheckpointError, FormatError
from .meta import build_empty, init_empty_weights
from .pack import pack
from .plan import Plan
from .plan.types import PlanError
from .pretrained import from_pretrained
from .stream import Report, StreamedModel, stream
from .session import Session

__all__ = [
    "stream", "from_pretrained", "StreamedModel", "Session", "load_eager", "pack", "Report", "Plan", "init_empty_weights",
    "build_empty", "parse_budget", "parse_bytes",
    "LayerstreamError", "BudgetError", "WeightMismatch", "MetaBufferError", "ReadError", "ModelError",
    "ClosedError", "FormatError", "CheckpointError", "ChecksumError", "PlanError",
]
__version__ = "0.1.0"
