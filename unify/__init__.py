"""Offline half of Brownout: calibrate, group and merge the experts of an MoE model into united experts."""
from runtime.version import __version__

__all__ = ["__version__"]
