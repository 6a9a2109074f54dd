"""A conversion plan describes every module fully before anything is written: producing the
output tensors adds nothing to its reports, and a rank reduction's spectra are computed once."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

import adapterctl.ops.convert.plan as plan_mod
from adapterctl.format.config import LoraConfig
from adapterctl.format.rawtensor import CAST_TARGETS, OpenStore
from adapterctl.ops.convert import convert_adapter
from tests.helpers import Q, V, lora_tensors, write_adapter

CASES = {
    "rank": {"rank": 2},
    "energy": {"energy": 0.9},
    "rank+dtype": {"rank": 3, "dtype": "bfloat16"},
    "dtype": {"dtype": "float16"},
}


def _source(tmp_path: Path) -> Path:
    tensors = {**lora_tensors(Q, d_in=16, d_out=16), **lora_tensors(V, d_in=16)}
    return write_adapter(tmp_path / "src", tensors, {"target_modules": ["q_proj", "v_proj"]})


def _plan(src: Path, store: Any, **options: Any) -> plan_mod.Plan:
    config = LoraConfig.from_file(src / "adapter_config.json")
    dtype = options.get("dtype")
    code = CAST_TARGETS[dtype] if dtype else None
    opts = plan_mod.Options(None, code, options.get("rank"), options.get("energy"))
    return plan_mod.Plan(store, config, opts)


def _reports(plan: plan_mod.Plan) -> list[dict[str, Any]]:
    """Copies (a report's lists are its own: what a later step appends must show)."""
    return [copy.deepcopy({**r.to_dict(), "dropped_norm": r.dropped_norm}) for r in plan.reports]


@pytest.mark.parametrize("case", list(CASES))
def test_the_reports_are_complete_before_anything_is_written(case: str, tmp_path: Path) -> None:
    options = CASES[case]
    src = _source(tmp_path)
    with OpenStore(src / "adapter_model.safetensors", "safetensors") as store:
        plan = _plan(src, store, **options)
        planned = _reports(plan)
        for o in plan.outputs:
            o.produce()
        assert _reports(plan) == planned  # writing added nothing
    reducing = "rank" in options or "energy" in options
    for report in planned:
        assert (report["energy"] is not None) == reducing, report
        assert (report["relative_error"] is not None) == reducing, report
        assert any(a.startswith("rank ") for a in report["actions"]) == reducing, report
        assert ("float32->" in " ".join(report["actions"])) == ("dtype" in options), report
    result = convert_adapter(src, tmp_path / "out", **options)
    assert [m.to_dict() for m in result.modules] == [
        {k: v for k, v in r.items() if k != "dropped_norm"} for r in planned
    ]


@pytest.mark.parametrize("case", ["rank", "energy"])
def test_each_spectrum_is_computed_once(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One basis of B and one of A per module, while planning; the writer reuses them."""
    calls: list[str] = []
    real = plan_mod.basis

    def counting(x: Any, side: str) -> Any:
        calls.append(side)
        return real(x, side)

    monkeypatch.setattr(plan_mod, "basis", counting)
    convert_adapter(_source(tmp_path), tmp_path / "out", **CASES[case])
    assert sorted(calls) == ["A", "A", "B", "B"]  # two modules
