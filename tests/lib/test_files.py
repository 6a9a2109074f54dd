"""format/files.py: reading small untrusted files, bounded by the kind's cap and by what is there."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from adapterctl.format.files import LIMITS, UnreadableFileError, read_small


def test_a_small_file_costs_its_size_not_the_cap(tmp_path: Path) -> None:
    """The config cap is 16 MiB; reading a 2 KiB config allocates about 2 KiB, not the cap."""
    path = tmp_path / "adapter_config.json"
    path.write_bytes(b"{}" + b" " * 2046)
    tracemalloc.start()
    try:
        data = read_small(path, "adapter config")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data == path.read_bytes()
    assert LIMITS["adapter config"] >= 1 << 20
    assert peak < 256 << 10, peak


@pytest.mark.parametrize("size", [0, 1, (1 << 16) + 3, 300_000])
def test_every_byte_up_to_the_cap(tmp_path: Path, size: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    assert read_small(path, "model card", limit=300_000) == path.read_bytes()


def test_over_the_cap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1001)
    with pytest.raises(UnreadableFileError, match="larger than"):
        read_small(path, "model card", limit=1000)
