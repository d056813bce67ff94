"""Offline half of Brownout: calibrate, group and merge the experts of an MoE model into united experts."""

__version__ = "0.1.0"
