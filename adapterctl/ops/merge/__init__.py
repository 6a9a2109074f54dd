"""`adapterctl merge` and the one merge rule, one module each:

- `rule`: the per-variant arithmetic of merging one adapter into one weight, for numpy arrays and
  torch tensors alike (`AdapterModel.merge_and_unload` and `load --merge-to` use it too);
- `plan`: what each base tensor becomes, from the adapters' configs and keys and the base's headers;
- `shards`: `--max-shard-size`, the split into shards and the index, as transformers writes them;
- `stream`: `merge`, one tensor at a time from the base into the output shards;
- `verify`: `--verify`, the written shards against a float64 recomputation.

Code outside this package imports only the names below (an import-linter contract says so).
"""

from adapterctl.ops.merge.plan import CONV1D_MODEL_TYPES, model_type
from adapterctl.ops.merge.rule import KINDS, Kind, Step, bias_sequence, delta, merge_sequence
from adapterctl.ops.merge.shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from adapterctl.ops.merge.stream import DTYPE_CHOICES, MergeResult, Progress, merge, peak_memory
from adapterctl.ops.merge.verify import Check, Verification, VerificationFailed

__all__ = [
    "CONV1D_MODEL_TYPES",
    "DEFAULT_MAX_SHARD_SIZE",
    "DTYPE_CHOICES",
    "KINDS",
    "Check",
    "Kind",
    "MergeResult",
    "Progress",
    "Step",
    "Verification",
    "VerificationFailed",
    "bias_sequence",
    "delta",
    "merge",
    "merge_sequence",
    "model_type",
    "parse_size",
    "peak_memory",
]
