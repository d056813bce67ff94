"""Serving as a library: request traces, SLO controllers, service-rate calibration and `BrownoutServer`, which runs a
trace on transformers' continuous batching and turns the brownout ratio every engine step."""
from .controller import SALC, Controller, FixedRatio, LatencyProfile, ModelPredictive, PIController, make_controller
from .server import BrownoutServer, ServeConfig, ServeResult, capacity, summarize, timeline
from .trace import Request, Trace, burst_test, bursty, poisson

__all__ = ["BrownoutServer", "ServeConfig", "ServeResult", "summarize", "capacity", "timeline", "Controller",
           "FixedRatio", "SALC", "PIController", "ModelPredictive", "LatencyProfile", "make_controller", "Trace",
           "Request", "poisson", "bursty", "burst_test"]
