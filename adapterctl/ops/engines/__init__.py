"""Serving readiness (`inspect --engine`): would vLLM, TGI, LoRAX, llama.cpp or PEFT load an
adapter, and compute what PEFT 0.21.2 computes? (docs/engines.md lists every rule and its source.)

The rules are data: one table per engine (a module each: `vllm`, `tgi`, `lorax`, `llamacpp`),
whose rules apply to a range of the engine's releases; each rule is an id, a level ("error":
the engine refuses the adapter; "warning": it loads and computes something else), a predicate
over the adapter (`facts.Facts`: config, classified tensors, per-module rank/alpha/scaling as
`ops.checks` worked them out from the patterns, and the base's config.json where given) that
returns the finding's message or None, and its source (the engine's file and the releases read).
`report` runs them (`evaluate`, `judge`). No torch, no network (a Hub base's config.json is
downloaded, nothing else).
"""

from adapterctl.ops.engines.facts import FACTOR_KINDS, EngineTable, Facts, Rule
from adapterctl.ops.engines.lorax import lorax_padded_rank
from adapterctl.ops.engines.report import (
    ENGINES,
    TABLES,
    EngineReport,
    Finding,
    Verdict,
    evaluate,
    facts_of,
    judge,
    parse_engine,
    read_base_config,
)

__all__ = [
    "ENGINES",
    "FACTOR_KINDS",
    "TABLES",
    "EngineReport",
    "EngineTable",
    "Facts",
    "Finding",
    "Rule",
    "Verdict",
    "evaluate",
    "facts_of",
    "judge",
    "lorax_padded_rank",
    "parse_engine",
    "read_base_config",
]
