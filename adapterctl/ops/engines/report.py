"""Verdicts: each engine's table run over one adapter (`evaluate`), the engine specs
(`vllm`, `vllm@0.8`, `peft@0.10`), and an `inspect` report with verdicts (`judge`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapterctl.errors import InvalidOptionError
from adapterctl.format.config import PEFT_VERSION
from adapterctl.format.peftversions import peft_version_findings, release
from adapterctl.ops.checks import tensor_kinds
from adapterctl.ops.engines.facts import EngineTable, Facts
from adapterctl.ops.engines.llamacpp import LLAMACPP
from adapterctl.ops.engines.lorax import LORAX
from adapterctl.ops.engines.tgi import TGI
from adapterctl.ops.engines.vllm import VLLM
from adapterctl.ops.inspect import AdapterReport, InspectReport

TABLES: dict[str, EngineTable] = {t.engine: t for t in (VLLM, TGI, LORAX, LLAMACPP)}
ENGINES = ("vllm", "tgi", "lorax", "llama.cpp", "peft")


# --- verdicts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    level: str
    rule: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"level": self.level, "rule": self.rule, "message": self.message}


@dataclass(frozen=True)
class Verdict:
    engine: str
    version: str
    findings: tuple[Finding, ...]
    needs: tuple[str, ...]

    @property
    def loads(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    @property
    def same_as_peft(self) -> bool:
        return self.loads and not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "version": self.version,
            "loads": self.loads,
            "same_as_peft": self.same_as_peft,
            "findings": [f.to_dict() for f in self.findings],
            "needs": list(self.needs),
        }


def parse_engine(spec: str) -> tuple[str, str]:
    """`vllm` / `peft@0.10` -> (engine, version); refuses engines and versions without a table."""
    name, _, version = spec.partition("@")
    name = name.strip().lower()
    if name not in ENGINES:
        raise InvalidOptionError(
            f"unknown engine `{spec}`", hint=f"engines: {', '.join(ENGINES)} (peft@X.Y)"
        )
    if name == "peft":
        return name, release(version) if version and version != PEFT_VERSION else PEFT_VERSION
    table = TABLES[name]
    if not version:
        return name, table.version
    found = _release_of(version.strip(), table.releases)
    if found is None:
        known = table.releases
        span = known[0] if len(known) == 1 else f"releases {known[0]} to {known[-1]}"
        raise InvalidOptionError(
            f"no rules for {name} {version}", hint=f"{name}'s rules cover {span}"
        )
    return name, found


def _release_of(version: str, releases: Sequence[str]) -> str | None:
    """`0.8` or `0.8.5` -> `0.8` when the table covers that minor release."""
    if version in releases:
        return version
    minor = ".".join(version.split(".")[:2])
    return minor if minor in releases and version.count(".") == 2 else None


def evaluate(facts: Facts, spec: str, peft_errors: Sequence[str] = ()) -> Verdict:
    """The verdict of one engine (`vllm`, `peft@0.10`, ...) on one adapter; `peft_errors`: what
    `inspect` found that PEFT 0.21.2 itself refuses (the `peft` engine's own findings)."""
    name, version = parse_engine(spec)
    if name == "peft":
        return _peft_verdict(facts, version, peft_errors)
    table = TABLES[name]
    found = []
    for rule in table.rules_for(version):
        message = rule.check(facts)
        if message is not None:
            found.append(Finding(rule.level, rule.id, message))
    needs = table.needs(facts, version) if not any(f.level == "error" for f in found) else []
    return Verdict(name, version, tuple(found), tuple(needs))


def _peft_verdict(facts: Facts, version: str, peft_errors: Sequence[str]) -> Verdict:
    """PEFT 0.21.2 loads what `inspect` finds no error in, and is the reference; another
    release: what `format.peftversions` says that release does with this config and modules."""
    found = [Finding("error", "peft.file", m) for m in peft_errors]
    if version != PEFT_VERSION:
        modules = sorted({m.path.replace(".base_layer", "") for m in facts.lora})
        found += [Finding(*f) for f in peft_version_findings(facts.config, version, modules)]
    return Verdict("peft", version, tuple(found), ())


def read_base_config(base: str | os.PathLike[str], *, token: str | None = None) -> dict[str, Any]:
    """The base's config.json: a local folder's (or the file itself), or a Hub id's (only that
    file downloaded)."""
    from adapterctl.format.files import read_small
    from adapterctl.ops.hub import hub_errors, hub_or_local

    found = hub_or_local(base, bare=True)
    if isinstance(found, str):
        from huggingface_hub import hf_hub_download

        from adapterctl.ops.hub import endpoint

        with hub_errors(found, path="config.json"):
            path = hf_hub_download(found, "config.json", token=token, endpoint=endpoint())
    else:
        path = os.fspath(found / "config.json" if found.is_dir() else found)
    try:
        data = json.loads(read_small(path, "model config"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidOptionError(f"`{path}` is not a model's config.json: {e}") from e
    if not isinstance(data, dict):
        raise InvalidOptionError(f"`{path}` is not a model's config.json (not a JSON object)")
    return data


# --- an inspect report with verdicts ----------------------------------------------------------


@dataclass(frozen=True)
class EngineReport:
    """`inspect --engine`: the inspect report and, per adapter, one verdict per engine asked."""

    inspect: InspectReport
    verdicts: tuple[tuple[Verdict, ...], ...]  # per adapter, in the report's order

    @property
    def failed(self) -> bool:
        """Some engine asked for would not load an adapter or would compute something else."""
        return any(not v.same_as_peft for vs in self.verdicts for v in vs)

    def to_dict(self, *, lazy: bool = False) -> dict[str, Any]:
        doc = self.inspect.to_dict(lazy=lazy)
        for adapter, verdicts in zip(doc["adapters"], self.verdicts, strict=True):
            adapter["engines"] = [v.to_dict() for v in verdicts]
        return doc


def facts_of(adapter: AdapterReport, base: dict[str, Any] | None = None) -> Facts | None:
    """What the rules see of one inspected adapter (None: it has no config)."""
    if adapter.config is None:
        return None
    kinds = adapter.kinds or tuple(tensor_kinds(adapter.tensors, adapter.config))
    return Facts(adapter.config, adapter.tensors, kinds, adapter.modules, base)


def judge(
    report: InspectReport, engines: Sequence[str], base: dict[str, Any] | None = None
) -> EngineReport:
    """Every adapter of `report` against every engine of `engines` (`vllm`, `peft@0.10`...)."""
    for spec in engines:
        parse_engine(spec)  # refuse a bad name before any work
    verdicts = []
    for adapter in report.adapters:
        facts = facts_of(adapter, base)
        if facts is None:
            missing = Finding("error", "config", "no adapter_config.json: no engine loads it")
            verdicts.append(tuple(Verdict(*parse_engine(s), (missing,), ()) for s in engines))
            continue
        peft_errors = [p.message for p in adapter.errors]
        verdicts.append(tuple(evaluate(facts, s, peft_errors) for s in engines))
    return EngineReport(report, tuple(verdicts))
