"""Every field of PEFT 0.21.2's `LoraConfig`, by what it does to a loaded LoRA layer.

Each field is one of three kinds:

- COMPUTED: adapterctl computes it exactly as PEFT does (tested against PEFT);
- INERT: it does not change what a loaded layer computes (metadata, training-only or
  initialisation-only settings that a saved adapter's weights make irrelevant);
- VARIANT: switches on a LoRA variant that adapterctl does not compute. Every command refuses to
  compute such an adapter and names the variant ("this adapter uses KaSA (`kasa_config`), which
  adapterctl does not compute"); `inspect` names it instead of reporting its tensors as errors,
  and copies (`select`, `push`) carry it unchanged.

Sources are cited as `peft/<file>:<what>` in the installed peft 0.21.2
(`peft/tuners/lora/{config,layer,variants,model,tp_layer,gptq}.py`, `peft/config.py`,
`peft/tuners/tuners_utils.py`, `peft/utils/other.py`). `tests/lib/test_variants.py` fails when
PEFT's `LoraConfig` gains or loses a field, so a new PEFT cannot slip a variant past this table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from adapterctl.errors import UnsupportedVariantError

COMPUTED = "computed"
INERT = "inert"
VARIANT = "variant"

#: hint of every refusal
PEFT_HINT = "load it with PEFT (`PeftModel.from_pretrained`), which computes it"


@dataclass(frozen=True)
class FieldRule:
    """What one LoraConfig field does to a loaded layer.

    off: the values that leave a VARIANT off, as PEFT tests them: "null" (only null is off: PEFT
    turns any object, `{}` included, into its sub-config, which is then on), "falsy" (PEFT tests
    `bool(value)`: null, false, 0 and empty lists/objects are off) or "object" (PEFT turns an
    object, `{}` included, into its sub-config and tests `bool()` of anything else).
    tensors: name parts (`.lora_diag`) of the tensors the variant stores next to lora_A/lora_B.
    free_shapes: the variant's lora_A/lora_B are not (r, in) and (out, r), so their shapes are no
    error.
    """

    field: str
    kind: str
    variant: str | None = None
    off: str = "null"
    tensors: tuple[str, ...] = ()
    free_shapes: bool = False

    def is_on(self, value: Any) -> bool:
        if self.kind != VARIANT:
            return False
        if self.off == "null":
            return value is not None
        return bool(value) or (self.off == "object" and isinstance(value, dict))


_C, _I, _V = COMPUTED, INERT, VARIANT

FIELDS: tuple[FieldRule, ...] = (
    # --- peft/config.py: PeftConfigMixin and PeftConfig ---------------------------------------
    FieldRule("task_type", _C),  # picks the model class; SEQ_CLS saves classifier/score heads
    FieldRule("peft_type", _C),  # must be "LORA" (format/config.py validates it)
    FieldRule("auto_mapping", _I),  # which class saved it: used only to pick a model class
    FieldRule("peft_version", _I),  # metadata
    FieldRule("base_model_name_or_path", _I),  # metadata: which base to load
    FieldRule("revision", _I),  # metadata: the base's revision
    FieldRule("inference_mode", _I),  # PEFT writes true; training mode is chosen at load time
    # --- peft/tuners/lora/config.py: LoraConfig --------------------------------------------------
    FieldRule("r", _C),
    FieldRule("target_modules", _C),  # engine/targets.py: PEFT's matching rules
    FieldRule("exclude_modules", _C),
    FieldRule("lora_alpha", _C),
    FieldRule("lora_dropout", _C),  # identity in eval mode, nn.Dropout in train mode
    FieldRule("fan_in_fan_out", _C),  # Conv1D layers store (in, out)
    FieldRule("bias", _C),
    FieldRule("use_rslora", _C),  # scaling alpha/sqrt(r)
    FieldRule("modules_to_save", _C),
    # values are checked one by one in engine/init.py:check_init (plain: true, false, gaussian,
    # eva, orthogonal; residual: pissa, olora) and INIT_VARIANTS below
    FieldRule("init_lora_weights", _C),
    FieldRule("layers_to_transform", _C),
    FieldRule("layers_pattern", _C),
    FieldRule("rank_pattern", _C),
    FieldRule("alpha_pattern", _C),
    # peft/tuners/lora/tp_layer.py:dispatch_megatron: `if config.megatron_config:` imports the
    # megatron core module and builds tensor-parallel LoRA layers
    FieldRule("megatron_config", _V, "Megatron tensor parallelism", off="falsy"),
    FieldRule("megatron_core", _I),  # the module megatron_config imports; nothing without it
    # peft/utils/other.py (`trainable_token_indices is not None`): a TrainableTokensWrapper
    # replaces rows of the embedding with `trainable_tokens_delta`; adapterctl has no such layer
    FieldRule("trainable_token_indices", _V, "trainable tokens"),
    # LoraConfig.__post_init__ resets it to {} unless init_lora_weights is "loftq" (a value that
    # INIT_VARIANTS refuses); the saved weights make it irrelevant otherwise
    FieldRule("loftq_config", _I),
    # initialisation only: layer.py:update_layer zero-inits B for "eva" (overwritten by the
    # saved weights); __post_init__ ignores it for other inits
    FieldRule("eva_config", _I),
    # initialisation only: read by layer.py:corda_init for init_lora_weights "corda", which
    # engine/init.py:check_init refuses (its initial adapter needs calibration data)
    FieldRule("corda_config", _I),
    # initialisation only: read by layer.py:lora_ga_init for init_lora_weights "lora_ga", which
    # INIT_VARIANTS refuses
    FieldRule("lora_ga_config", _I),
    FieldRule("use_dora", _C),  # variants.py:DoraLinearVariant etc., engine/layers.py
    # variants.py:VeloraLinearVariant, `is_lora_variant` (stores lora_velora_embed buffers)
    FieldRule("velora_config", _V, "VeLoRA", tensors=(".lora_velora_",)),
    # variants.py:ALoraLinearVariant: the adapter acts only from the invocation tokens on
    FieldRule("alora_invocation_tokens", _V, "aLoRA", off="falsy"),
    # gptq.py: QALoraLinearVariant pools the input in groups of qalora_group_size; an adapter
    # for a GPTQ base, which adapterctl does not load
    FieldRule("use_qalora", _V, "QALoRA", off="falsy"),
    FieldRule("qalora_group_size", _I),  # read only when use_qalora is on
    # variants.py:MontecloraLinearVariant, `is_lora_variant` (stores lora_monteclora_sampler);
    # __post_init__ converts only an object into MontecloraConfig
    FieldRule("monteclora_config", _V, "MonteCLoRA", off="object", tensors=(".lora_monteclora_",)),
    # model.py:_prepare_model: `if peft_config.layer_replication:` stacks copies of layers
    FieldRule("layer_replication", _V, "layer replication", off="falsy"),
    FieldRule("runtime_config", _I),  # LoraConfig.to_dict drops it: never in a saved config
    FieldRule("lora_bias", _C),
    # layer.py:ParamWrapper: LoRA on nn.Parameters (MoE experts); model.py: `if not
    # target_parameters` is off
    FieldRule("target_parameters", _V, "LoRA on parameters", off="falsy"),
    # variants.py:BdLoraLinearVariant, `is_lora_variant`: block-diagonal lora_A or lora_B whose
    # shapes are (r, in/nblocks) or (out, r/nblocks)
    FieldRule("use_bdlora", _V, "BD-LoRA", free_shapes=True),
    # variants.py:ArrowLinearVariant, `is_lora_variant`: per-token routing over several adapters
    FieldRule("arrow_config", _V, "Arrow", tensors=(".lora_arrow.",)),
    # variants.py:KasaLinearVariant, `is_lora_variant`: truncates the base weight's SVD and puts
    # a learned diagonal (lora_diag) between A and B
    FieldRule("kasa_config", _V, "KaSA", tensors=(".lora_diag",)),
    # tuners_utils.py:_check_tied_module_exists: the adapter of a tied layer (lm_head) becomes
    # the embedding's adapter, which adapterctl does not tie
    FieldRule("ensure_weight_tying", _V, "weight-tied adapters", off="falsy"),
)

BY_FIELD: dict[str, FieldRule] = {rule.field: rule for rule in FIELDS}

#: init_lora_weights values that PEFT treats as a variant or that change the base on load:
#: config.py (`lora_variants: ["mica"]`, variants.py:MiCALinearVariant), layer.py:loftq_init
#: (replaces the base weight by its quantized copy), layer.py:lora_ga_init.
INIT_VARIANTS: dict[str, str] = {"mica": "MiCA", "loftq": "LoftQ", "lora_ga": "LoRA-GA"}


@dataclass(frozen=True)
class Variant:
    name: str  # "KaSA"
    setting: str  # how the config spells it: "`kasa_config`"
    rule: FieldRule | None  # None for an init_lora_weights value

    def __str__(self) -> str:
        return f"{self.name} ({self.setting})"


def variants_in(config: Any) -> list[Variant]:
    """The variants adapterctl does not compute that `config` (a LoraConfig) switches on."""
    found = []
    for rule in FIELDS:
        if rule.kind == VARIANT and rule.is_on(getattr(config, rule.field)):
            assert rule.variant is not None
            found.append(Variant(rule.variant, f"`{rule.field}`", rule))
    init = config.init_lora_weights
    if isinstance(init, str) and init in INIT_VARIANTS:
        found.append(Variant(INIT_VARIANTS[init], f'`init_lora_weights: "{init}"`', None))
    return found


def variant_message(found: Iterable[Variant]) -> str:
    """ "this adapter uses KaSA (`kasa_config`), which adapterctl does not compute"."""
    names = [str(v) for v in found]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"this adapter uses {listed}, which adapterctl does not compute"


def refuse_variants(config: Any, label: str | None = None, hint: str = PEFT_HINT) -> None:
    """Raise UnsupportedVariantError naming every variant `config` switches on, if any."""
    found = variants_in(config)
    if found:
        where = f"`{label}`: " if label else ""
        raise UnsupportedVariantError(where + variant_message(found), hint=hint)


def variant_tensor(path: str, found: Iterable[Variant]) -> tuple[str, str] | None:
    """For one of the variants' own tensors (KaSA's `...q_proj.lora_diag`, a key's path without
    the `base_model.model.` prefix): its module and its kind (`...q_proj`, `lora_diag`); else None."""
    for v in found:
        for part in v.rule.tensors if v.rule else ():
            at = path.find(part)
            if at > 0:
                return path[:at], path[at + 1 :]
    return None


def free_shapes(found: Iterable[Variant]) -> bool:
    """Whether a variant's LoRA factors may have shapes other than (r, in) and (out, r)."""
    return any(v.rule is not None and v.rule.free_shapes for v in found)
