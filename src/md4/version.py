"""The version of md4 (the same as pyproject.toml's), importable without importing the package's modules."""

__version__ = "0.1.0"
