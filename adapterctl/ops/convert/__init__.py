"""`adapterctl convert` and the conversions the library runs, one module each:

- `adapter`: `convert_adapter`, one adapter rewritten in a streaming pass (the command's work);
- `plan`: what the output holds and how each tensor is made (`Plan`, `convert_tensors`);
- `initial`: the initial PiSSA/OLoRA/CorDA factors, saved or rebuilt from the base;
- `dora`: `--dora-to-lora`, each DoRA module's weight change on the base as plain LoRA factors;
- `dense`: a whole weight change (d_out x d_in) as LoRA factors: exact at its support, or cut
  by LAPACK's or a seeded randomized SVD to a rank or an energy (`--dora-to-lora`, `extract`);
- `embeddings`: `--embeddings-to-lora`, full embedding copies and trainable tokens as LoRA factors;
- `derived`: the store in which those two hold their new factors, one module at a time;
- `targeted`: the config in which modules saved whole become LoRA targets of scaling 1;
- `lowrank`: factored SVDs and Gram matrices of low-rank deltas (rank reduction, verification);
- `portable`: `--portable`, scalings folded into B and one padded rank (`Kept`: what it keeps);
- `verify`: `--verify`, the written files against the source;
- `finite`: the check that a conversion makes no new NaN or ±Inf;
- `blas`: one BLAS thread for the small products.

Code outside this package imports only the names below (an import-linter contract says so).
"""

from adapterctl.ops.convert.adapter import (
    ConversionResult,
    Progress,
    VerificationFailed,
    convert_adapter,
    one_adapter,
)
from adapterctl.ops.convert.blas import one_blas_thread
from adapterctl.ops.convert.dense import Factored, Target, factor
from adapterctl.ops.convert.initial import REBUILDABLE, irreproducible
from adapterctl.ops.convert.lowrank import Spectrum, spectrum
from adapterctl.ops.convert.plan import (
    ModuleReport,
    convert_tensors,
    converted_config,
    reduced_config,
)
from adapterctl.ops.convert.portable import Kept
from adapterctl.ops.convert.verify import EXACT, UNIT, Check, Verification, factored_allowance

__all__ = [
    "EXACT",
    "REBUILDABLE",
    "UNIT",
    "Check",
    "ConversionResult",
    "Factored",
    "Kept",
    "ModuleReport",
    "Progress",
    "Spectrum",
    "Target",
    "Verification",
    "VerificationFailed",
    "convert_adapter",
    "convert_tensors",
    "converted_config",
    "factor",
    "factored_allowance",
    "irreproducible",
    "one_adapter",
    "one_blas_thread",
    "reduced_config",
    "spectrum",
]
