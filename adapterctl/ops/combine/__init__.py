"""`adapterctl combine`: several adapters into one, from their files alone, one module each:

- `methods`: PEFT's task-vector operations (TIES, DARE, magnitude pruning, task arithmetic) on
  numpy arrays;
- `sources`: each SOURCE found and read, what cannot be combined exactly refused;
- `plan`: the options, every module's sources, ranks and shapes, the output config;
- `compute`: each module's combined factors (cat, svd, the factor-wise and delta-wise methods);
- `verify`: `--verify`, the written factors against a float64 recomputation;
- `card`: the output's model card (base model, method, sources and weights);
- `run`: `combine` itself and its result.

Code outside this package imports only the names below (an import-linter contract says so).
"""

from adapterctl.ops.combine.methods import METHODS, SIGN_METHODS
from adapterctl.ops.combine.run import (
    CombineResult,
    ModuleCombined,
    Progress,
    VerificationFailed,
    combine,
)
from adapterctl.ops.combine.sources import SUPPORTED

__all__ = [
    "METHODS",
    "SIGN_METHODS",
    "SUPPORTED",
    "CombineResult",
    "ModuleCombined",
    "Progress",
    "VerificationFailed",
    "combine",
]
