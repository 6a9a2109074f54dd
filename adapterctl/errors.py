"""Error hierarchy and exit codes (standard library only).

The core raises `AdapterctlError` subclasses; the CLI's one error boundary turns them into an
`error:` line, an optional `hint:` line and the exit code below.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    INTERNAL = 3
    INTERRUPTED = 130


class AdapterctlError(Exception):
    """An expected, actionable failure: exit 1 with one `error:` line."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    @property
    def type_name(self) -> str:
        return type(self).__name__


class AdapterNotFoundError(AdapterctlError):
    """The source path, adapter name or weights file does not exist."""


class AdapterFormatError(AdapterctlError):
    """A bad adapter_config.json, safetensors header, .bin pickle or directory layout."""


class ConfigError(AdapterFormatError):
    """adapter_config.json is missing a field, has a wrong type or an invalid value."""


class NotAnAdapterError(AdapterFormatError):
    """A transformers model (directory or weights file) where an adapter was expected."""


class IncompatibleModelError(AdapterctlError):
    """The adapter does not fit the base model: no target matches, shapes differ, unsupported layer."""


class OutputError(AdapterctlError):
    """The output cannot be written: it exists, is a symlink, or is not writable."""


class SelectionError(AdapterctlError):
    """A `select` request that names adapters or renames that do not fit the source."""


class ConversionError(AdapterctlError):
    """A trained/initial adapter pair that cannot be converted to plain LoRA (says what differs)."""


class UnsupportedVariantError(AdapterctlError):
    """The adapter uses a LoRA variant (KaSA, BD-LoRA, ...) that adapterctl does not compute."""


class MissingDependencyError(AdapterctlError):
    """An optional dependency needed for this input is not installed."""


class InvalidOptionError(AdapterctlError):
    """Options that are invalid or conflict (`--rank 0`, `--rank` with `--energy`): a usage error."""

    exit_code = ExitCode.USAGE


class StandardOutputError(AdapterctlError):
    """The command's output could not be written to standard output (a full disk, a file-size
    limit, an I/O error): the result is incomplete, so the command fails."""
