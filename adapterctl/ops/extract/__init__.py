"""`adapterctl extract`: a plain LoRA adapter from a full fine-tune (TUNED - BASE), one module each:

- `plan`: the two checkpoints' headers matched by name: targets, whole tensors, refusals;
- `deltas`: each module's change read one module at a time, factored (ops/convert/dense.py), cast;
- `stream`: `extract` itself: plan, factors, the written adapter, the config and card;
- `verify`: `--verify`, the written adapter against TUNED - BASE recomputed;
- `result`: `ExtractResult` and what it reports.

Code outside this package imports only the names below (an import-linter contract says so).
"""

from adapterctl.ops.extract.result import ExtractResult, ModuleResult, VerificationFailed
from adapterctl.ops.extract.stream import BIAS_CHOICES, Progress, extract

__all__ = [
    "BIAS_CHOICES",
    "ExtractResult",
    "ModuleResult",
    "Progress",
    "VerificationFailed",
    "extract",
]
