"""The package version: one place, read by the package, the manifests it writes and pyproject.toml."""

__version__ = "0.1.0"
