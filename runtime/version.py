"""The package version, recorded in every united checkpoint."""

__version__ = "0.2.0"
