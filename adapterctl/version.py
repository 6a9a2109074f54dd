"""The package version (its own module, so that any layer can read it without the package API)."""

__version__ = "0.1.0"
