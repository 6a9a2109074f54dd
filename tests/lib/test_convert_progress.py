"""`convert_adapter(progress=...)`: the bytes written, then a phase per step after them (or before
them, for --energy), each counted to its total."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapterctl.ops.convert import convert_adapter
from tests.helpers import Q, V, lora_tensors, write_adapter


def _run(tmp_path: Path, **options: Any) -> dict[str, list[tuple[int, int]]]:
    tensors = {**lora_tensors(Q), **lora_tensors(V, d_out=16)}
    src = write_adapter(tmp_path / "src", tensors, {"target_modules": ["q_proj", "v_proj"]})
    calls: dict[str, list[tuple[int, int]]] = {}

    def progress(advance: int, total: int, phase: str = "converting") -> None:
        calls.setdefault(phase, []).append((advance, total))

    convert_adapter(src, tmp_path / "out", progress=progress, **options)
    return calls


def _done(calls: list[tuple[int, int]]) -> bool:
    return sum(n for n, _ in calls) == calls[-1][1] > 0


def test_verify_reports_its_own_phase(tmp_path: Path) -> None:
    calls = _run(tmp_path, dtype="bfloat16", verify_output=True)
    assert list(calls) == ["converting", "verifying"]
    assert _done(calls["converting"])
    assert calls["verifying"][0] == (0, 2)  # announced at 0: two modules, nothing else
    assert _done(calls["verifying"])


def test_energy_reports_finding_ranks_first(tmp_path: Path) -> None:
    calls = _run(tmp_path, energy=0.9)
    assert list(calls) == ["finding ranks", "converting"]
    assert _done(calls["finding ranks"])
    assert calls["finding ranks"][-1][1] == 2
