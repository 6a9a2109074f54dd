"""Every dtype the safetensors format defines: size in bits and the name torch gives it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dtype:
    code: str  # the safetensors spelling, e.g. "BF16"
    bits: int
    torch_name: str | None  # None where torch has no dtype with the same layout
    numpy_name: str | None  # a numpy dtype with the same bytes (bfloat16/float8 as raw integers)

    @property
    def display_name(self) -> str:
        """The torch name when there is one, else the safetensors code."""
        return self.torch_name or self.code


_TABLE = [
    Dtype("BOOL", 8, "bool", "bool"),
    Dtype("F4", 4, None, None),
    Dtype("F6_E2M3", 6, None, None),
    Dtype("F6_E3M2", 6, None, None),
    Dtype("U8", 8, "uint8", "uint8"),
    Dtype("I8", 8, "int8", "int8"),
    Dtype("F8_E5M2", 8, "float8_e5m2", "uint8"),
    Dtype("F8_E4M3", 8, "float8_e4m3fn", "uint8"),
    Dtype("F8_E8M0", 8, "float8_e8m0fnu", "uint8"),
    Dtype("F8_E4M3FNUZ", 8, "float8_e4m3fnuz", "uint8"),
    Dtype("F8_E5M2FNUZ", 8, "float8_e5m2fnuz", "uint8"),
    Dtype("I16", 16, "int16", "<i2"),
    Dtype("U16", 16, "uint16", "<u2"),
    Dtype("F16", 16, "float16", "<f2"),
    Dtype("BF16", 16, "bfloat16", "<u2"),
    Dtype("I32", 32, "int32", "<i4"),
    Dtype("U32", 32, "uint32", "<u4"),
    Dtype("F32", 32, "float32", "<f4"),
    Dtype("C64", 64, "complex64", "<c8"),
    Dtype("F64", 64, "float64", "<f8"),
    Dtype("I64", 64, "int64", "<i8"),
    Dtype("U64", 64, "uint64", "<u8"),
]

DTYPES: dict[str, Dtype] = {d.code: d for d in _TABLE}
BY_TORCH_NAME: dict[str, Dtype] = {d.torch_name: d for d in _TABLE if d.torch_name}
