"""Serve a request trace on transformers' continuous batching, with a per-step brownout hook (docs/design.md §7).

    bm = BrownoutMoE.attach(model, united_dir)
    with BrownoutServer(bm, config=ServeConfig(use_cuda_graph=True)) as srv:
        srv.controller = make_controller("mpc", 0.25, 0.15, capacity=measure_capacity(srv))
        res = srv.run(burst_test(base_rate=4.0, duration_scale=0.24))
    summarize(res, 0.25, 0.15)

The handle. `BrownoutServer` takes a `runtime.BrownoutMoE`, or any object with the same serving protocol:
`.model` (the transformers model to serve), `.set_ratio(float)` (called before a step whose ratio differs from the
last one), and, only when `ServeConfig.use_cuda_graph` is on, `.graph_safe` (bool) and `.set_graph_safe(bool)`.

How it hooks transformers 5 (generation/continuous_batching): `model.init_continuous_batching(...)` returns a
`ContinuousBatchingManager` whose background thread loops `prepare_next_batch()` -> `self._generation_step()` ->
`update_batch()`. `_generation_step` is looked up on the manager instance each iteration, so the server replaces it
on the instance with a wrapper. When the wrapper runs, the batch is already scheduled: `batch_processor
.inputs_and_outputs.requests_in_batch` lists the requests with their query lengths, and a request with no generated
token yet is prefilling. The wrapper (1) classifies the step (prefill tokens, decode tokens; transformers mixes both
in one step), (2) asks the controller for the ratio and calls `set_ratio(r)` before the forward, (3) runs the
original step, and (4) feeds the controller once the step is done. Nothing in transformers is copied or forked;
requests go in through the public `add_request` and come back through `get_result`.

Synchronous or async batching (`ServeConfig.async_batching`). Synchronously (the default) the original step ends with
the device-to-host copy of the sampled tokens: the wall time around it is the step's latency, and the host's work
between steps (scheduling, batch preparation, bookkeeping: 20-27% of a saturated step on the H200) adds to every
step. With transformers' async batching the step returns once its work is queued on the engine's compute stream, and
the host prepares the next batch while the GPU runs this one (transformers keeps two IO pairs). The hook then (a)
takes the batch from the current IO pair, (b) writes the ratio on the compute stream, so it lands between the
previous step's forward and this one's without a host synchronisation, (c) times the step with CUDA events on that
stream (its GPU time, what the controller's step model predicts), and (d) feeds the controller at the first hook that
finds the step's end event passed: about when transformers hands its tokens out, one step after the launch. A
request's first token is known only after that update, so a request stays "prefilling" to the hook until its
last prompt chunk has run.

Attention (`ServeConfig.attention`). With "sdpa" (the default, the model's own) transformers attends every step over
the whole batch's gathered KV with a mask. "varlen" switches the model, for the engine's lifetime, to torch's
variable-length FlashAttention (`varlen_attention.py`): the engine then packs the sequences and each query reads only
its own KV (checked on transformers 5.24).

CUDA graphs (`use_cuda_graph=True`): a captured graph replays what it captured, so the server switches the handle to
graph-safe mode when the engine starts (`set_graph_safe(True)`: the brownout layers run their backend at every
ratio, 0 included, and read the ratio from a device scalar that `set_ratio` rewrites in place, so graphs captured
at any ratio follow the controller) and restores the previous mode when the engine stops. Where the backend cannot
follow the ratio from device memory (the CPU, a policy whose remap a graph freezes), `set_graph_safe` raises a
BrownoutError and the engine does not start.

Engine lifetime: inside `with server:` one manager serves every `run` (runs share its batching, cache and captured
graphs); each run installs its own hook through a dispatcher, uses request ids unique to the run, and first waits
until the previous run's cancelled requests are gone. A bare `run` starts and stops its own manager. After a ratio
change the hook writes the ratio scalar on transformers' compute stream (where it replays its graphs), so the write
is ordered before the next forward and after the last one.

Clock: real time. Requests are submitted by a driver (the caller's thread) when the trace's arrival time comes, on
`time.perf_counter`; latencies are measured from the arrival time in the trace, so the driver's own lateness counts
against the server, never for it.

Admission: at most `max_queue` requests wait (admitted, not yet scheduled); an arrival beyond that is rejected at
once with status "rejected" (`full_queue="reject"`, serving), or held at the door in trace order until there is room
and rejected only if the trace's last arrival time passes first (`full_queue="hold"`, the saturation runs of
`calibration`: every run then admits the same requests in the same order, whatever its speed and timing). A request
that has not been scheduled `queue_timeout_s` after arriving, or is not finished `request_timeout_s` after arriving,
is cancelled with status "timeout"; after the last arrival the driver waits at most `drain_timeout_s`, then cancels
what is left and stops the engine (hard stop if it does not exit), so a run always ends.

Per-token records: every generated token's time; its latency is TTFT (first token: time since arrival) or the
inter-token gap. Tokens of a rejected / timed-out / failed request that were never produced count as SLO misses
(otherwise rejecting would improve the violation rate).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ..errors import BrownoutError
from .controller import Controller, FixedRatio, quantile
from .engine_steps import StepsInFlight, scheduled_requests

log = logging.getLogger(__name__)

OK, REJECTED, TIMEOUT, FAILED = "ok", "rejected", "timeout", "failed"
# KV cache room per batch slot when the model is on the CPU and `num_blocks` is None: transformers would size the
# cache from a share of the machine's RAM (gigabytes, slow to allocate), far more than a CPU run can serve
CPU_CACHE_TOKENS_PER_REQUEST = 1024


ATTENTIONS = ("sdpa", "varlen")  # what ServeConfig.attention takes
FULL_QUEUE = ("reject", "hold")  # what ServeConfig.full_queue takes


@dataclass
class ServeConfig:
    max_batch: int = 64  # requests per step (transformers' max_requests_per_batch)
    max_batch_tokens: int = 1024  # query tokens per step (prompt chunks + decode tokens)
    max_queue: int = 256  # admitted requests waiting to be scheduled; more are rejected (or held, below)
    # a full queue: "reject" the arrival (serving), or "hold" it and the ones behind it until there is room, up to
    # the trace's last arrival time (a closed loop at max_queue waiting: which requests a saturated run serves no
    # longer depends on when slots happened to free; see the module docstring)
    full_queue: str = "reject"
    queue_timeout_s: float = 30.0
    request_timeout_s: float = 120.0
    drain_timeout_s: float = 60.0
    # KV cache blocks of `page_size` tokens (None: on an accelerator transformers sizes it from free memory, up to
    # `max_memory_percent`; on the CPU, max_batch x CPU_CACHE_TOKENS_PER_REQUEST tokens)
    num_blocks: int | None = None
    page_size: int = 256
    max_memory_percent: float | None = 0.5
    use_cuda_graph: bool = False
    # torch.compile the engine's forward + sampling through transformers' own path (default_compile_level=1: its
    # default compile config, dynamic shapes, then CUDA graphs of the compiled function when use_cuda_graph is on;
    # 5.24 breaks the graph at each paged-cache update, 5.17 compiles the varlen path whole). The brownout
    # experts are custom ops (runtime.ops), so the graph does not break at them; on CUDA the handle runs graph-safe
    # (the ratio read from a device scalar) so the compiled code never guards on, or recompiles for, the ratio.
    # On transformers 5.17 / an H200 the compiled engine did not finish its warm-up within 120 s (Dynamo compiling
    # and recompiling); on 5.24 it serves, with Dynamo's recompile limit raised (eval/results/README.md, "Compiled
    # serving")
    compile: bool = False
    # CUDA-graph padding granularity of the query / KV lengths in tokens (0: transformers' defaults, 64 / 16384 in
    # 5.24). A finer KV grain means more graphs but less attention over padding on every step
    q_padding_tokens: int = 0
    kv_padding_tokens: int = 0
    # transformers' async batching (CUDA only, transformers >= 5.24 checked): the host prepares the next batch while
    # the GPU runs this one, so its bookkeeping leaves the step's latency; steps are timed on the GPU by CUDA events
    # and the controller hears of a step about one step after its launch (see the module docstring)
    async_batching: bool = False
    # the engine's attention: "sdpa" (the model's own; transformers masks each step's attention over the whole
    # batch's gathered KV) or "varlen" (packed sequences, each query reads only its own KV: torch's FlashAttention-2
    # on CUDA in half precision, its PyTorch twin elsewhere; runtime/serving/varlen_attention.py). The model's
    # attention is switched for the engine's lifetime and switched back when it stops
    attention: str = "sdpa"
    seed: int = 0
    record_steps: bool = True


@dataclass
class RequestRecord:
    rid: int
    arrival: float  # s from the run's start (the trace's time)
    prompt_len: int
    output_len: int  # tokens asked for
    status: str = "pending"
    submit: float = math.nan  # when the driver submitted it (s from start)
    token_times: list[float] = field(default_factory=list)  # s from start
    error: str | None = None


@dataclass
class StepRecord:
    t0: float  # s from start: the step's launch
    t1: float  # its end as the host saw it (async batching: the first hook after its end event passed)
    step_s: float  # forward + sampling + copy-out (wall time); with async batching the GPU time (CUDA events)
    prefill_tokens: int
    decode_tokens: int
    requests: int
    ratio: float
    waiting: int = 0  # requests in the scheduler's queue, not in this step


@dataclass
class ServeResult:
    requests: list[RequestRecord]
    steps: list[StepRecord]
    wall_s: float
    config: dict
    controller: str
    errors: list[str] = field(default_factory=list)
    graphs_captured: int | None = None  # CUDA graphs the engine captured during this run (None: not known)

    def to_dict(self) -> dict:
        return {"requests": [asdict(r) for r in self.requests], "steps": [asdict(s) for s in self.steps],
                "wall_s": self.wall_s, "config": self.config, "controller": self.controller, "errors": self.errors,
                "graphs_captured": self.graphs_captured}


class BrownoutServer:
    """Serve traces on one model with transformers' continuous batching and a brownout controller.

    `bm`: a `runtime.BrownoutMoE` handle, or any object with `.model` and `.set_ratio(float)` (plus `.graph_safe` and
    `.set_graph_safe(bool)` when `config.use_cuda_graph` is on; see the module docstring). `controller`: the default
    for runs that pass none (fixed ratio 0 if None); it may be replaced between runs (`server.controller = ...`).
    """

    def __init__(self, bm, controller: Controller | None = None, config: ServeConfig | None = None,
                 vocab_size: int | None = None):
        if not callable(getattr(bm, "set_ratio", None)) or getattr(bm, "model", None) is None:
            raise BrownoutError(f"BrownoutServer takes a BrownoutMoE handle (an object with .model and .set_ratio), "
                                f"got {type(bm).__name__}")
        self.bm = bm
        self.model = bm.model
        self.controller = controller or FixedRatio(0.0)
        self.cfg = config or ServeConfig()
        self.vocab_size = vocab_size or self.model.config.get_text_config().vocab_size
        self._last_ratio: float | None = None
        self._mgr = None  # the running engine, kept between runs inside `with server:` (one set of CUDA graphs)
        self._orig_step = None
        self._hook: Callable[[], None] | None = None
        self._runs = 0
        self._graph_safe_before: bool | None = None  # the handle's mode before start switched it (None: untouched)
        self._attention_before: list | None = None  # the model's attention before start switched it (None: untouched)
        self._cuda = next(self.model.parameters()).device.type == "cuda"

    def __enter__(self) -> "BrownoutServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ engine set-up
    def _manager(self):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        gc = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=-1, pad_token_id=0)
        num_blocks = self.cfg.num_blocks
        if num_blocks is None and next(self.model.parameters()).device.type == "cpu":
            num_blocks = math.ceil(self.cfg.max_batch * CPU_CACHE_TOKENS_PER_REQUEST / self.cfg.page_size)
        kw = dict(max_requests_per_batch=self.cfg.max_batch, max_batch_tokens=self.cfg.max_batch_tokens,
                  use_async_batching=self.cfg.async_batching, use_cuda_graph=self.cfg.use_cuda_graph,
                  allow_block_sharing=False, page_size=self.cfg.page_size, num_blocks=num_blocks, seed=self.cfg.seed,
                  max_memory_percent=self.cfg.max_memory_percent)
        if self.cfg.compile:  # transformers' default compile of its paths: mode "default", dynamic shapes
            kw["default_compile_level"] = 1
            if self.cfg.attention == "varlen":
                # transformers leaves the varlen path uncompiled under a flash attention (its max lengths change
                # every step); ours is kept out of the graph instead (varlen_attention_forward), so ask for the
                # config level 1 gives with SDPA
                from transformers import CompileConfig

                kw["varlen_compile_config"] = CompileConfig(mode="default", fullgraph=False, dynamic=True)
            # 5.24 compiles the attention forward once per layer (it guards on layer_idx): past Dynamo's default
            # limit of 8 entries the later layers would run eagerly
            from ..compile_outside import raise_recompile_limits

            raise_recompile_limits()
        if self.cfg.q_padding_tokens:
            kw["q_padding_interval_size"] = self.cfg.q_padding_tokens
        if self.cfg.kv_padding_tokens:
            kw["kv_padding_interval_size"] = self.cfg.kv_padding_tokens
        fields = set(getattr(ContinuousBatchingConfig, "__dataclass_fields__", {}))
        if fields and "page_size" not in fields:  # transformers <= 5.17.0 called it block_size
            kw["block_size"] = kw.pop("page_size")
        if fields and self.cfg.async_batching and "use_async_batching" not in fields:
            raise BrownoutError("async_batching: this transformers' continuous batching has none (5.24 has it)")
        if fields:
            dropped = sorted(set(kw) - fields)
            if dropped:
                log.warning("this transformers' ContinuousBatchingConfig has no %s: left at its default", dropped)
            kw = {k: v for k, v in kw.items() if k in fields}
        cbc = ContinuousBatchingConfig(**kw)
        return self.model.init_continuous_batching(generation_config=gc, continuous_batching_config=cbc)

    def _apply_ratio(self, r: float, stream=None) -> None:
        """Set the handle's ratio if it changed. `stream`: the engine's compute stream, where the write is ordered
        between two forwards; without one (outside a step) the write is waited for on the host."""
        if r == self._last_ratio:
            return
        if stream is not None:
            import torch

            with torch.cuda.stream(stream):
                self.bm.set_ratio(r)
        else:
            self.bm.set_ratio(r)
            if self._cuda:
                # the runtime writes the ratio into a device scalar on this thread's stream; transformers runs (and
                # replays its graphs) on its own compute stream, which does not wait for ours
                import torch

                torch.cuda.current_stream().synchronize()
        self._last_ratio = r

    def start(self) -> None:
        """Start the engine (transformers' continuous-batching manager) once; runs reuse it until `close`. With CUDA
        graphs on, the handle is switched to graph-safe mode first (a BrownoutError from it stops the start)."""
        if self._mgr is not None:
            return
        if self.cfg.async_batching and not self._cuda:
            raise BrownoutError("async_batching needs the model on CUDA (transformers overlaps steps on CUDA streams)")
        if self.cfg.attention not in ATTENTIONS:
            raise BrownoutError(f"ServeConfig.attention: one of {ATTENTIONS}, got {self.cfg.attention!r}")
        if self.cfg.use_cuda_graph or (self.cfg.compile and self._cuda):
            self._enter_graph_safe()
        try:
            if self.cfg.attention == "varlen":
                from .varlen_attention import use_varlen_attention

                self._attention_before = use_varlen_attention(self.model)
            self._last_ratio = None  # the handle's ratio may have been turned outside the server
            self._apply_ratio(0.0)
            mgr = self._manager()
            self._orig_step = mgr._generation_step

            def dispatch():  # the per-run hook, or the plain step between runs
                (self._hook or self._orig_step)()

            mgr._generation_step = dispatch
            mgr.start()
        except BaseException:
            self._leave_graph_safe()
            self._restore_attention()
            raise
        self._mgr = mgr

    def _enter_graph_safe(self) -> None:
        if not callable(getattr(self.bm, "set_graph_safe", None)):
            raise BrownoutError(f"use_cuda_graph (and compile on CUDA) need a handle with set_graph_safe (a "
                                f"captured graph would freeze the ratio); {type(self.bm).__name__} has none")
        before = bool(self.bm.graph_safe)
        self.bm.set_graph_safe(True)
        self._graph_safe_before = before

    def _restore_attention(self) -> None:
        before, self._attention_before = self._attention_before, None
        if before is not None:
            from .varlen_attention import restore_attention

            restore_attention(before)

    def _leave_graph_safe(self) -> None:
        before, self._graph_safe_before = self._graph_safe_before, None
        if before is not None:
            self.bm.set_graph_safe(before)

    def close(self, errors: list[str] | None = None) -> None:
        """Stop the engine (hard stop if it does not exit in 10 s), set the ratio back to 0 and the handle's
        graph-safe mode back to what it was before `start`."""
        mgr, self._mgr = self._mgr, None
        if mgr is None:
            return
        errors = [] if errors is None else errors
        try:
            mgr.stop(block=True, timeout=10)
            if mgr.is_running():
                errors.append("engine did not stop in 10 s: hard stop")
                mgr.stop(block=True, timeout=10, hard_stop=True)
        finally:
            mgr._generation_step = self._orig_step
            try:
                mgr.destroy()
            except Exception as e:  # pragma: no cover - best effort clean-up
                errors.append(f"destroy: {e!r}")
            try:
                self._apply_ratio(0.0)
            finally:
                self._leave_graph_safe()
                self._restore_attention()

    def _reopen_admission(self) -> None:
        """Work around a transformers continuous-batching stall (seen on 5.24): when the cache fills, the scheduler
        offloads and sets `block_new_requests`, which only a request *finishing* clears. If the active requests are
        cancelled instead (the driver's timeouts), it stays set with an empty cache and the engine never schedules again.
        With nothing active there is nothing to protect, so clear it (a bool, written from the driver thread)."""
        sch = getattr(getattr(self._mgr, "batch_processor", None), "scheduler", None)
        if sch is not None and getattr(sch, "block_new_requests", False) and not getattr(sch, "active_requests", 1):
            sch.block_new_requests = False
            wake = getattr(self._mgr, "_wake_up_loop", None)
            if wake is not None:
                wake.set()

    def graph_count(self) -> int | None:
        """CUDA graphs the running engine holds (best effort over transformers' private layout; None if unknown). A
        capture stalls its step by about two eager forwards, so a timed run should capture few or none."""
        if self._mgr is None:
            return None
        bp = getattr(self._mgr, "batch_processor", None)
        if bp is None:  # the engine thread has not built its batch processor yet: nothing captured
            return 0
        io = getattr(bp, "inputs_and_outputs", None)
        if io is None:
            return None
        n = 0
        for x in [p.device_io for p in getattr(io, "io_pairs", [])] or [io]:  # async batching keeps two IO pairs
            store = getattr(getattr(x, "graphs", None), "_storage", None)
            if not isinstance(store, dict):
                return None
            n += len(store)
        return n

    def _wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Wait until the engine holds no request (cancellations are processed asynchronously), so the next run
        starts on an empty batch and cache."""
        mgr = self._mgr
        t = time.perf_counter()
        while mgr is not None and mgr.is_running() and time.perf_counter() - t < timeout_s:
            bp = getattr(mgr, "batch_processor", None)
            pending = bp.has_pending_requests() if bp is not None and hasattr(bp, "has_pending_requests") else False
            queued = any(q is not None and not q.empty()
                         for q in (getattr(mgr, "input_queue", None), getattr(mgr, "cancel_queue", None)))
            if not pending and not queued:
                return True
            while mgr.get_result(timeout=0) is not None:  # results of cancelled requests: drop them
                pass
            self._reopen_admission()
            time.sleep(0.01)
        return False

    # ------------------------------------------------------------------ serving
    def run(self, trace, prompts: list[list[int]] | None = None, on_progress: Callable[[float], None] | None = None,
            controller: Controller | None = None) -> ServeResult:
        """Serve `trace` (runtime.serving.trace.Trace) in real time and return the records. Prompts are random token ids
        (seeded) unless given. `controller` replaces the server's for this run (and is reset first). Inside
        `with server:` the engine (and its CUDA graphs) stays up between runs; otherwise each run starts and stops
        one."""
        cfg = self.cfg
        if cfg.full_queue not in FULL_QUEUE:
            raise BrownoutError(f"ServeConfig.full_queue: one of {FULL_QUEUE}, got {cfg.full_queue!r}")
        ctl = controller or self.controller
        ctl.reset()
        if hasattr(ctl, "bind"):  # the engine's batch size: the MPC's queueing model needs it
            ctl.bind(self.cfg.max_batch)
        rng = np.random.default_rng(cfg.seed)
        reqs = trace.requests
        if prompts is None:
            prompts = [rng.integers(1, self.vocab_size, r.prompt_len).tolist() for r in reqs]
        self._runs += 1
        tag = f"{self._runs}-r"  # request ids are unique across the runs of one engine
        recs = {f"{tag}{r.rid}": RequestRecord(r.rid, r.t, r.prompt_len, r.output_len) for r in reqs}
        steps: list[StepRecord] = []
        errors: list[str] = []
        started: set[str] = set()  # written by the engine thread only
        last_tok: dict[str, float] = {}  # engine thread: time of each request's last token (perf_counter)
        hook_times: dict[str, list[float]] = {}  # engine thread: per-request token times (s from start)
        own_engine = self._mgr is None
        self.start()  # a new engine starts at ratio 0 (after the switch to graph-safe mode, if graphs are on)
        if not own_engine:
            self._last_ratio = None
            self._apply_ratio(0.0)
        if not own_engine and not self._wait_idle():
            errors.append("engine still busy with the previous run's requests after 30 s")
        mgr = self._mgr
        orig_step = self._orig_step
        t_start = [0.0]
        graphs0 = self.graph_count()

        prefilled: set[str] = set()  # engine thread: requests whose last prompt chunk has been launched
        clock = None  # async batching: the steps in flight (StepsInFlight), made at the first step

        def finish(info, t2: float, step_s: float) -> None:
            """A step is done (its tokens are out at `t2`, perf_counter): token times, controller feedback, record."""
            t1, r, pre, dec, emit, n_pre, n_dec, n_batch, n_wait = info
            now = t2 - t_start[0]
            for rid in emit:
                hook_times.setdefault(rid, []).append(now)
            if pre:
                arr = [recs[x].arrival for x in pre if x in recs]
                if arr:
                    ctl.observe("prefill", now - min(arr), now, n_pre + n_dec, r, step_s)
            if dec:
                gaps = [t2 - last_tok[x] for x in dec if x in last_tok]
                if gaps:
                    ctl.observe("decode", max(gaps), now, n_pre + n_dec, r, step_s)
            for rid in emit:
                last_tok[rid] = t2
            if cfg.record_steps:
                steps.append(StepRecord(t1 - t_start[0], now, step_s, n_pre, n_dec, n_batch, r, n_wait))

        def hook():
            nonlocal clock
            io = mgr.batch_processor.inputs_and_outputs
            stream = getattr(io, "compute_stream", None)
            if cfg.async_batching and clock is None:
                clock = StepsInFlight(stream)
            t0 = time.perf_counter()
            if clock is not None:  # async: the steps the GPU has finished since the last hook
                for info, gpu_s in clock.done():
                    finish(info, t0, gpu_s)
            batch = list(scheduled_requests(io))
            n_pre = n_dec = 0
            pre, dec, emit = [], [], []
            for fs in batch:
                st = fs.state
                rid = st.request_id
                # generated_len() lags a step under async batching: a request prefills until its last chunk ran
                if st.generated_len() == 0 and rid not in prefilled:
                    n_pre += fs.query_length
                    pre.append(rid)
                    if fs.has_new_token:
                        prefilled.add(rid)
                else:
                    n_dec += fs.query_length
                    dec.append(rid)
                if fs.has_new_token:
                    emit.append(rid)
                started.add(rid)
            # the admission queue (requests the scheduler holds but did not schedule in this batch)
            queued = getattr(getattr(mgr.batch_processor, "scheduler", None), "waiting_requests", None) or {}
            arrivals = [recs[x].arrival for x in list(queued) if x in recs]
            ctl.observe_queue(t0 - t_start[0] - min(arrivals) if arrivals else 0.0, len(arrivals), t0 - t_start[0],
                              len(batch))
            r = ctl.step_ratio(bool(pre), bool(dec), t0 - t_start[0], n_pre + n_dec)
            self._apply_ratio(r, stream)
            t1 = time.perf_counter()
            info = (t1, r, pre, dec, emit, n_pre, n_dec, len(batch), len(arrivals))
            if clock is None:  # synchronous: the step has ended (tokens copied out) when it returns
                orig_step()
                t2 = time.perf_counter()
                finish(info, t2, t2 - t1)
            else:
                start = clock.begin()
                orig_step()
                clock.launched(start, info)

        outstanding: dict[str, float] = {}  # rid -> arrival, admitted and not yet resolved
        waiting: set[str] = set()  # admitted, not yet seen in a step (driver's view)
        try:
            t_start[0] = time.perf_counter()
            self._hook = hook
            i, n = 0, len(reqs)
            last_arrival = reqs[-1].t if reqs else 0.0
            deadline = None
            while True:
                now = time.perf_counter() - t_start[0]
                # 1. submit due arrivals
                held = False
                while i < n and reqs[i].t <= now:
                    q = reqs[i]
                    rid = f"{tag}{q.rid}"
                    rec = recs[rid]
                    waiting.difference_update([w for w in waiting if w in started])
                    if (cfg.full_queue == "hold" and len(waiting) >= cfg.max_queue and mgr.is_running()
                            and now <= last_arrival):
                        held = True  # at the door, with everything behind it, until a waiting request is scheduled
                        break
                    i += 1
                    if len(waiting) >= cfg.max_queue or not mgr.is_running():
                        rec.status = REJECTED
                        continue
                    rec.submit = now
                    got = mgr.add_request(prompts[i - 1], request_id=rid, max_new_tokens=q.output_len,
                                          record_timestamps=True)
                    if got is None:
                        rec.status = REJECTED
                        continue
                    outstanding[rid] = q.t
                    waiting.add(rid)
                    ctl.observe_arrival(now, q.prompt_len, q.output_len)
                # 2. collect results
                # (held: a full queue; poll, do not spin, since the engine thread needs the GIL)
                wait = (0.002 if i >= n or held
                        else max(0.0, min(0.02, reqs[i].t - (time.perf_counter() - t_start[0]))))
                res = mgr.get_result(timeout=wait) if outstanding else None
                while res is not None:
                    self._finish(res, recs, outstanding, t_start[0])
                    res = mgr.get_result(timeout=0) if outstanding else None
                if not outstanding and not mgr.is_running() and i < n:
                    # the engine died: everything still to come is rejected
                    for q in reqs[i:]:
                        recs[f"{tag}{q.rid}"].status = REJECTED
                    i = n
                # 3. timeouts
                self._reopen_admission()
                now = time.perf_counter() - t_start[0]
                for rid, arr in list(outstanding.items()):
                    not_started = rid not in started
                    if (not_started and now - arr > cfg.queue_timeout_s) or now - arr > cfg.request_timeout_s:
                        mgr.cancel_request(rid)
                        recs[rid].status = TIMEOUT
                        outstanding.pop(rid)
                        waiting.discard(rid)
                if not mgr.is_running() and outstanding:
                    err = getattr(mgr.background_thread_status, "fatal_error", None)
                    errors.append(f"engine stopped: {err!r}")
                    for rid in list(outstanding):
                        recs[rid].status, recs[rid].error = FAILED, repr(err)
                        outstanding.pop(rid)
                if on_progress is not None:
                    on_progress(now)
                # 4. end of run
                if i >= n:
                    if deadline is None:
                        deadline = max(now, last_arrival) + cfg.drain_timeout_s
                    if not outstanding:
                        break
                    if now > deadline:
                        for rid in list(outstanding):
                            mgr.cancel_request(rid)
                            recs[rid].status = TIMEOUT
                            outstanding.pop(rid)
                        break
        finally:
            wall = time.perf_counter() - t_start[0]
            self._hook = None
            graphs1 = self.graph_count()
            if own_engine or not mgr.is_running():
                self.close(errors)
            else:
                self._apply_ratio(0.0)
        # token times of cancelled requests come from the hook (the engine delivers nothing for them)
        for rid, rec in recs.items():
            if rec.status == TIMEOUT and not rec.token_times:
                rec.token_times = list(hook_times.get(rid, []))[: rec.output_len]
            if rec.status == "pending":
                rec.status = REJECTED
        captured = graphs1 - graphs0 if graphs0 is not None and graphs1 is not None else None
        return ServeResult(list(recs.values()), steps, wall, asdict(cfg), getattr(ctl, "name", str(ctl)), errors,
                           captured)

    @staticmethod
    def _finish(res, recs, outstanding, t_start: float) -> None:
        rid = res.request_id
        rec = recs.get(rid)
        if rec is None or not res.is_finished():
            return
        outstanding.pop(rid, None)
        ts = [t - t_start for t in (res.timestamps or [])]
        rec.token_times = ts[: len(res.generated_tokens)] if res.generated_tokens else ts
        if res.error is not None:
            rec.status, rec.error = FAILED, res.error
        elif rec.status != TIMEOUT:
            rec.status = OK


# ---------------------------------------------------------------------- metrics
def token_latencies(rec: RequestRecord) -> tuple[float | None, list[float]]:
    """(TTFT or None, inter-token gaps) of one request."""
    t = rec.token_times
    if not t:
        return None, []
    return t[0] - rec.arrival, [b - a for a, b in zip(t, t[1:])]


def _pcts(v: list[float]) -> dict:
    if not v:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "std": None}
    a = np.asarray(v)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "std": float(a.std())}


def summarize(res: ServeResult, slo_prefill: float, slo_decode: float, t0: float = 0.0,
              t1: float = math.inf) -> dict:
    """Token-level SLO metrics over requests arriving in [t0, t1).

    violation rates: share of tokens missing their SLO (first tokens vs `slo_prefill`, later tokens vs `slo_decode`;
    tokens never produced count as misses); goodput: SLO-meeting tokens per second of the arrival span, and requests
    per second whose TTFT and mean TPOT both meet their SLOs; spread: p99 - p50 and the standard deviation.
    """
    rs = [r for r in res.requests if t0 <= r.arrival < t1]
    ttft, tpot = [], []
    pre_total = pre_miss = dec_total = dec_miss = 0
    good_req = 0
    by_status: dict[str, int] = {}
    for r in rs:
        by_status[r.status] = by_status.get(r.status, 0) + 1
        first, gaps = token_latencies(r)
        pre_total += 1
        dec_total += max(0, r.output_len - 1)
        if first is None:
            pre_miss += 1
            dec_miss += max(0, r.output_len - 1)
            continue
        ttft.append(first)
        tpot.extend(gaps)
        pre_miss += first > slo_prefill
        dec_miss += sum(g > slo_decode for g in gaps) + max(0, r.output_len - 1 - len(gaps))
        if r.status == OK and first <= slo_prefill and (not gaps or sum(gaps) / len(gaps) <= slo_decode):
            good_req += 1
    if rs:
        span = max(1e-9, (min(t1, max(r.arrival for r in rs)) if math.isinf(t1) else t1) - max(t0, 0.0))
    else:
        span = max(1e-9, t1 - t0) if math.isfinite(t1) else 1.0
    steps = [s for s in res.steps if t0 <= s.t1 and (math.isinf(t1) or s.t0 < t1)]
    dur = sum(s.step_s for s in steps)
    toks = sum(s.prefill_tokens + s.decode_tokens for s in steps)
    tot = pre_total + dec_total
    miss = pre_miss + dec_miss
    out = {
        "requests": len(rs), "status": by_status,
        "offered_rate": len(rs) / span,
        "violation_prefill": pre_miss / pre_total if pre_total else None,
        "violation_decode": dec_miss / dec_total if dec_total else None,
        "violation_all": miss / tot if tot else None,
        "attainment": 1 - miss / tot if tot else None,
        "goodput_tok_s": (tot - miss) / span,
        "goodput_req_s": good_req / span,
        "ttft": _pcts(ttft), "tpot": _pcts(tpot),
        "ttft_spread": (_pcts(ttft)["p99"] - _pcts(ttft)["p50"]) if ttft else None,
        "tpot_spread": (_pcts(tpot)["p99"] - _pcts(tpot)["p50"]) if tpot else None,
        "mean_ratio_time": (sum(s.ratio * s.step_s for s in steps) / dur) if dur > 0 else None,
        "mean_ratio_tokens": (sum(s.ratio * (s.prefill_tokens + s.decode_tokens) for s in steps) / toks)
        if toks else None,
        "steps": len(steps),
    }
    return out


def capacity(points: list[tuple[float, float]], target: float = 0.9) -> float | None:
    """Highest offered rate with attainment >= target, from (rate, attainment) points, interpolated linearly between
    the last passing and the first failing rate (None if even the lowest rate fails)."""
    pts = sorted((r, a) for r, a in points if a is not None)
    best = None
    for (r0, a0), (r1, a1) in zip(pts, pts[1:] + [(None, None)]):
        if a0 < target:
            break
        best = r0
        if r1 is not None and a1 < target:
            best = r0 + (r1 - r0) * (a0 - target) / max(1e-12, a0 - a1)
            break
    return best


def timeline(res: ServeResult, bin_s: float = 1.0) -> dict:
    """Per-bin series for plots: arrivals/s, p90 TTFT and TPOT of tokens produced in the bin, mean step ratio, and
    per step the mean of requests waiting and of requests running (the batch: how many slots were taken)."""
    end = max([res.wall_s] + [r.arrival for r in res.requests])
    nb = max(1, int(math.ceil(end / bin_s)))
    arr = [0] * nb
    ttft = [[] for _ in range(nb)]
    tpot = [[] for _ in range(nb)]
    rsum = [0.0] * nb
    rdur = [0.0] * nb
    wsum = [0.0] * nb
    nsum = [0.0] * nb
    wn = [0] * nb
    for r in res.requests:
        b = min(nb - 1, int(r.arrival / bin_s))
        arr[b] += 1
        if r.token_times:
            ttft[min(nb - 1, int(r.token_times[0] / bin_s))].append(r.token_times[0] - r.arrival)
            for a, c in zip(r.token_times, r.token_times[1:]):
                tpot[min(nb - 1, int(c / bin_s))].append(c - a)
    for s in res.steps:
        b = min(nb - 1, int(s.t1 / bin_s))
        rsum[b] += s.ratio * s.step_s
        rdur[b] += s.step_s
        wsum[b] += s.waiting
        nsum[b] += s.requests
        wn[b] += 1
    q = lambda v: quantile(v, 0.9) if v else None  # noqa: E731
    return {"t": [(i + 0.5) * bin_s for i in range(nb)], "arrivals_per_s": [a / bin_s for a in arr],
            "ttft_p90": [q(v) for v in ttft], "tpot_p90": [q(v) for v in tpot],
            "ratio": [rsum[i] / rdur[i] if rdur[i] > 0 else None for i in range(nb)],
            "waiting": [wsum[i] / wn[i] if wn[i] else None for i in range(nb)],
            "running": [nsum[i] / wn[i] if wn[i] else None for i in range(nb)]}
