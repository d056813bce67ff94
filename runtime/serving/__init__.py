"""Serving as a library: request traces, SLO controllers, service-rate calibration and `BrownoutServer`, which runs a
trace on transformers' continuous batching and turns the brownout ratio every engine step (docs/design.md §7).

    from runtime import BrownoutMoE
    from runtime.serving import BrownoutServer, ServeConfig, make_controller, burst_test, summarize, measure_capacity

    bm = BrownoutMoE.attach(model, united_dir)
    with BrownoutServer(bm, config=ServeConfig()) as srv:
        cap = measure_capacity(srv)            # saturated token rates at ratios 0 and 1, measured on this engine
        srv.controller = make_controller("mpc", slo_prefill=0.25, slo_decode=0.15, capacity=cap)
        res = srv.run(burst_test(base_rate=4.0, duration_scale=0.24))
    print(summarize(res, 0.25, 0.15))
"""
from .calibration import measure_capacity, measure_saturation, median_saturation, saturation_trace, service_rate
from .controller import SALC, Controller, FixedRatio, LatencyProfile, ModelPredictive, PIController, make_controller
from .server import BrownoutServer, ServeConfig, ServeResult, capacity, summarize, timeline
from .trace import Request, Trace, burst_test, bursty, poisson, ramp, spike

__all__ = ["BrownoutServer", "ServeConfig", "ServeResult", "summarize", "capacity", "timeline", "Controller",
           "FixedRatio", "SALC", "PIController", "ModelPredictive", "LatencyProfile", "make_controller", "Trace",
           "Request", "poisson", "bursty", "burst_test", "ramp", "spike", "measure_capacity", "measure_saturation",
           "median_saturation", "saturation_trace", "service_rate"]
