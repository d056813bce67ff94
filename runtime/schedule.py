"""Per-layer brownout ratios from measured sensitivity: one `level` knob that spends a weight-read budget where it
costs the least loss (docs/design.md §4: a ratio may be set per layer).

A schedule is built from the output of `unify sensitivity` (S.json): for each united layer, on a grid of ratios
0 = r_0 < ... < r_n = 1, the predicted loss increase L_l(r) (held-out NLL with only that layer browned out), and on
that grid or a finer one (`read_ratios`) the weight bytes saved per forward S_l(r). Both are taken as piecewise
linear in r between their grid points.

`schedule.at(level)` returns one ratio per united layer (sorted layer order, the list form of `BrownoutMoE.set_ratio`)
whose predicted bytes saved, sum_l S_l(r_l), equal those of the uniform ratio, sum_l S_l(level), and whose predicted
loss, sum_l L_l(r_l) (layers taken as additive), is as small as the allocation below can make it.

**The allocation: greedy on marginal loss per byte over each layer's lower convex hull.** Each layer's curve, as
points (S_l(r_i), L_l(r_i)), is replaced by its lower convex hull; the hull's segments of all layers are sorted by
slope (loss per byte saved) and taken whole, cheapest first, until the next one does not fit; that one is taken in
part. For a budget that is a sum of convex per-layer costs this greedy is exact (the fractional-knapsack argument:
any allocation can be improved by moving bytes from a steeper segment to a flatter one), and because a layer's own
segments are taken in order of its own slopes, every layer moves only forward as the level rises: the schedule is
monotone in `level`. Why not an exact knapsack over the grid points: with five noisy points per layer and an
additive model of loss, the gap between the convexified and the exact discrete problem is smaller than what the
measurement can resolve, and the greedy costs microseconds, so a serving controller can call `at` every step.

Consequences:
- every layer but at most one sits on a grid point of its hull (a grid ratio it was measured at); the one in
  between gets the ratio that reads exactly the remaining bytes on its measured bytes curve, so the byte budget is
  met exactly (in prediction), and its loss is predicted by its measured curve, which lies on or above the hull;
- grid points above the hull (a ratio that costs more than mixing its neighbours would) are skipped;
- at(0) is all zeros and at(1) all ones.

**Joint anchors.** The layers' losses do not add up: browning several layers out together costs a different amount
than the sum of their single-layer curves (on the reference model the uniform ratio costs less than the sum, and an
allocation that browns a few layers out fully costs more). So `unify sensitivity` also searches, at a few levels
(0.25, 0.5, 0.75 by default), for the allocation whose *joint* loss, measured on held-out calibration text, is the
least at the uniform ratio's bytes, and stores those allocations as anchors. With anchors, `at(level)` between two
neighbouring anchor levels a < level < b runs the same greedy, but with every layer held between its ratio at anchor
a (below) and at anchor b (above): the anchors' measured choices are kept, the single-layer curves only decide the
order in which layers move from one anchor to the next, the byte budget is still met exactly, and since the anchors
are ordered layer by layer the schedule stays monotone in `level`. Files without anchors (format version 1) give the
plain greedy over [0, 1].
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import BrownoutError
from .ratio import check_ratio

FORMAT_VERSION = 2  # the newest sensitivity file this module reads; version 1 files have no joint anchors


def _check_grid(ratios) -> list[float]:
    try:
        grid = [float(r) for r in ratios]
    except (TypeError, ValueError):
        raise BrownoutError(f"a ratio grid must be numbers, got {ratios!r}") from None
    if len(grid) < 2 or grid[0] != 0.0 or grid[-1] != 1.0 or any(not b > a for a, b in zip(grid, grid[1:])):
        raise BrownoutError(f"a schedule needs an ascending ratio grid from 0 to 1, got {list(ratios)}")
    return grid


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear y(x) on ascending xs, clamped to the ends."""
    if x <= xs[0]:
        return ys[0]
    for a in range(len(xs) - 1):
        if x <= xs[a + 1]:
            t = (x - xs[a]) / (xs[a + 1] - xs[a])
            return ys[a] + t * (ys[a + 1] - ys[a])
    return ys[-1]


def lower_hull(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Lower convex hull, left to right, of (bytes, loss, grid index) points in grid order with non-decreasing bytes,
    starting at (0, 0). Of points with equal bytes only the first is kept: a higher ratio that saves no more bytes
    buys nothing, and `RatioSchedule` maps bytes back to the smallest ratio that saves them."""
    pts: list[tuple[float, float, int]] = []
    for p in points:
        if pts and p[0] <= pts[-1][0]:
            continue
        pts.append(p)
    hull: list[tuple[float, float, int]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] on or above the chord hull[-2] -> p
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


@dataclass(frozen=True)
class _Segment:
    slope: float  # predicted loss per byte saved
    layer: int  # position in the sorted layer list
    order: int  # position along the layer's hull
    lo: float  # bytes saved at its start and end
    hi: float


class RatioSchedule:
    """Per-layer ratios for a `level` in [0, 1]; see the module docstring.

        sched = RatioSchedule.load("S.json")
        bm.set_ratio(sched.at(0.5))                  # one ratio per united layer, sorted layer order
        BrownoutServer(sched.bind(bm), controller)   # the controller turns the level
    """

    def __init__(self, ratios, layers: dict[int, dict], read_ratios=None, anchors: dict | None = None):
        """`ratios`: the grid (ascending, from 0 to 1); `layers`: {layer: {"nll_increase": [...], "saved_bytes": [...]}},
        one value per grid ratio, or with `read_ratios` (a finer grid holding every ratio of `ratios`) the bytes as
        "read_saved_bytes", one per read ratio. `anchors`: {level: one ratio per layer (sorted layer order)}, levels
        in (0, 1), each anchor's ratios at least those of the anchor below (see "Joint anchors" above)."""
        grid = _check_grid(ratios)
        read_grid = grid if read_ratios is None else _check_grid(read_ratios)
        if not set(grid) <= set(read_grid):
            raise BrownoutError("read_ratios must include every ratio of the loss grid")
        if not layers:
            raise BrownoutError("a schedule needs at least one layer")
        self.ratios, self.read_ratios = grid, read_grid
        self.layers = sorted(int(k) for k in layers)
        self.loss: list[list[float]] = []
        self.saved: list[list[float]] = []  # on read_ratios
        bytes_key = "saved_bytes" if read_ratios is None else "read_saved_bytes"
        for k in self.layers:
            d = layers[k] if k in layers else layers[str(k)]
            loss, saved = d.get("nll_increase"), d.get(bytes_key)
            if (not isinstance(loss, list) or not isinstance(saved, list) or len(loss) != len(grid)
                    or len(saved) != len(read_grid)):
                raise BrownoutError(f"layer {k}: nll_increase needs one value per ratio ({len(grid)}) and {bytes_key} "
                                    f"one per read ratio ({len(read_grid)})")
            try:
                loss, saved = [float(v) for v in loss], [float(v) for v in saved]
            except (TypeError, ValueError):
                raise BrownoutError(f"layer {k}: nll_increase and {bytes_key} must be numbers") from None
            if not all(math.isfinite(v) for v in loss + saved) or any(v < 0 for v in saved):
                raise BrownoutError(f"layer {k}: nll_increase and saved_bytes must be finite, saved_bytes >= 0")
            # Ratio 0 is the base model by definition; a larger ratio never reads more slabs (runtime.policy.remap
            # only moves experts from hot to cold), so a dip in the measured bytes is counting noise: smoothed away.
            loss = [v - loss[0] for v in loss]
            saved = list(itertools.accumulate((v - saved[0] for v in saved), max))
            self.loss.append(loss)
            self.saved.append(saved)
        self.anchors = self._check_anchors(anchors or {})

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "RatioSchedule":
        """From the dict `unify sensitivity` writes (keys `ratios` and `layers`)."""
        if not isinstance(data, dict) or "ratios" not in data or not isinstance(data.get("layers"), dict):
            raise BrownoutError("not a sensitivity file: expected keys 'ratios' and 'layers' (see `unify sensitivity`)")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BrownoutError(f"sensitivity file version {version!r} is newer than this runtime reads "
                                f"({FORMAT_VERSION}): upgrade brownout, or re-measure with this `unify sensitivity`")
        try:
            layers = {int(k): v for k, v in data["layers"].items()}
        except ValueError:
            raise BrownoutError("a sensitivity file's layers must be keyed by layer number") from None
        joint = data.get("joint") or {}
        levels, ratios = joint.get("levels", []), joint.get("ratios", [])
        if not isinstance(levels, list) or not isinstance(ratios, list) or len(levels) != len(ratios):
            raise BrownoutError("a sensitivity file's joint anchors need one ratio list per level")
        return cls(data["ratios"], layers, data.get("read_ratios"), dict(zip(levels, ratios)))

    @classmethod
    def load(cls, path) -> "RatioSchedule":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise BrownoutError(f"sensitivity file {p} does not exist") from None
        except (OSError, json.JSONDecodeError) as e:
            raise BrownoutError(f"cannot read sensitivity file {p}: {str(e).splitlines()[0][:160]}") from None
        return cls.from_dict(data)

    def _check_anchors(self, anchors: dict) -> dict[float, list[float]]:
        out: dict[float, list[float]] = {}
        for level in sorted(anchors, key=float):
            rs = anchors[level]
            if not isinstance(rs, (list, tuple)) or len(rs) != len(self.layers):
                raise BrownoutError(f"joint anchor at level {level}: need one ratio per layer ({len(self.layers)})")
            lv = check_ratio(level)
            if lv in (0.0, 1.0):
                raise BrownoutError("joint anchor levels must lie strictly between 0 and 1")
            out[lv] = [check_ratio(r) for r in rs]
        prev = [0.0] * len(self.layers)
        for lv, rs in out.items():
            if any(r < p - 1e-9 for r, p in zip(rs, prev)):
                raise BrownoutError(f"joint anchor at level {lv:g} lowers a layer's ratio below the anchor before it: "
                                    "a schedule must be monotone in the level")
            prev = rs
        return out

    def _segments(self, lower: list[float], upper: list[float]) -> list[_Segment]:
        """Hull segments of every layer's curve restricted to [lower, upper], sorted by slope."""
        segs = []
        for li, (loss, saved) in enumerate(zip(self.loss, self.saved)):
            lo, hi = lower[li], upper[li]
            rs = [lo] + [r for r in self.ratios if lo < r < hi] + ([hi] if hi > lo else [])
            pts = [(_interp(self.read_ratios, saved, r), _interp(self.ratios, loss, r), i) for i, r in enumerate(rs)]
            hull = lower_hull(pts)
            for o, (a, b) in enumerate(zip(hull, hull[1:])):
                segs.append(_Segment((b[1] - a[1]) / (b[0] - a[0]), li, o, a[0], b[0]))
        return sorted(segs, key=lambda s: (s.slope, s.layer, s.order))

    # -- queries --------------------------------------------------------------------------------------------------
    def least_loss(self, level) -> float:
        """A lower bound on the predicted loss (layers additive) of any per-layer ratios that save at least the bytes
        of the uniform ratio `level`: the same greedy as `at` with its last segment taken in part *on the hull* (the
        relaxation of the allocation problem). `at(level)` evaluates its in-between layer on the measured curve,
        which lies on or above the hull, so its predicted loss is at or above this bound (equal on convex curves)."""
        need, got, loss = self.saved_bytes(check_ratio(level)), 0.0, 0.0
        n = len(self.layers)
        for seg in self._segments([0.0] * n, [1.0] * n):
            take = min(seg.hi - seg.lo, need - got)
            if take <= 0:
                break
            loss += seg.slope * take
            got += take
        return loss

    def saved_bytes(self, ratios) -> float:
        """Predicted bytes saved per forward by one ratio per layer (a list), or by one ratio for all."""
        rs = self._as_list(ratios)
        return sum(_interp(self.read_ratios, s, r) for s, r in zip(self.saved, rs))

    def predicted_loss(self, ratios) -> float:
        """Predicted NLL increase (sum of the layers' measured curves) of one ratio per layer, or one for all."""
        rs = self._as_list(ratios)
        return sum(_interp(self.ratios, l, r) for l, r in zip(self.loss, rs))

    def at(self, level) -> list[float]:
        """One ratio per united layer (sorted layer order) saving the bytes of the uniform ratio `level`."""
        level = check_ratio(level)
        n = len(self.layers)
        if level == 0.0:
            return [0.0] * n
        if level == 1.0:
            return [1.0] * n
        stops = [(0.0, [0.0] * n), *self.anchors.items(), (1.0, [1.0] * n)]
        for (a, lower), (b, upper) in zip(stops, stops[1:]):
            if level == a:
                return list(lower)
            if level < b:
                return self.allocate(self.saved_bytes(level), lower, upper)
        return [1.0] * n

    def allocate(self, budget: float, lower=None, upper=None) -> list[float]:
        """One ratio per layer, each in [lower, upper] (lists; default 0 and 1), that saves `budget` bytes with the least
        summed single-layer loss (the greedy of the module docstring). A budget outside what the box can save is
        clamped to it."""
        n = len(self.layers)
        lower = [0.0] * n if lower is None else [check_ratio(r) for r in lower]
        upper = [1.0] * n if upper is None else [max(check_ratio(r), lo) for r, lo in zip(upper, lower)]
        target = [_interp(self.read_ratios, s, lo) for s, lo in zip(self.saved, lower)]  # bytes each layer saves
        budget -= sum(target)
        for seg in self._segments(lower, upper):
            if budget <= 0:
                break
            take = min(budget, seg.hi - seg.lo)
            target[seg.layer] = seg.lo + take
            budget -= take
        return [min(upper[li], max(lower[li], self.ratio_saving(li, b))) for li, b in enumerate(target)]

    def layer_saved(self, li: int, ratio: float) -> float:
        """Predicted bytes saved per forward by layer li (position in the sorted layer list) at `ratio`."""
        return _interp(self.read_ratios, self.saved[li], ratio)

    def ratio_saving(self, li: int, want: float) -> float:
        """The smallest ratio at which layer li's measured bytes curve reaches `want` bytes saved."""
        saved, grid = self.saved[li], self.read_ratios
        if want <= 0:
            return 0.0
        for a in range(len(grid) - 1):
            if saved[a + 1] >= want:
                if saved[a + 1] == saved[a]:
                    return grid[a]
                t = (want - saved[a]) / (saved[a + 1] - saved[a])
                return min(1.0, max(0.0, grid[a] + t * (grid[a + 1] - grid[a])))
        return 1.0

    def _as_list(self, ratios) -> list[float]:
        if isinstance(ratios, (list, tuple)):
            if len(ratios) != len(self.layers):
                raise BrownoutError(f"need one ratio per layer of the schedule ({len(self.layers)}), got {len(ratios)}")
            return [check_ratio(r) for r in ratios]
        return [check_ratio(ratios)] * len(self.layers)

    def check_layers(self, united_layers) -> None:
        """BrownoutError unless the schedule covers exactly these united layers."""
        have = sorted(int(i) for i in united_layers)
        if have != self.layers:
            raise BrownoutError(f"the schedule is for layers {self.layers}, the model's united layers are {have}: "
                                "measure this checkpoint with `unify sensitivity`")

    def bind(self, bm) -> "ScheduledBrownout":
        """A handle whose `set_ratio(level)` sets this schedule's ratios on `bm`, for code that turns one knob (the
        serving controller)."""
        return ScheduledBrownout(bm, self)

    def __repr__(self) -> str:
        return f"RatioSchedule(layers={self.layers}, ratios={self.ratios}, anchors={list(self.anchors)})"


class ScheduledBrownout:
    """Wraps a BrownoutMoE handle so one float, the level, drives the per-layer schedule: `set_ratio(level)` calls
    `bm.set_ratio(schedule.at(level))`. Everything else (model, graph-safe mode, detach, ...) is the handle's."""

    def __init__(self, bm, schedule: RatioSchedule):
        schedule.check_layers(bm.layers)
        self.bm, self.schedule = bm, schedule
        self.level = 0.0

    def set_ratio(self, level) -> None:
        self.bm.set_ratio(self.schedule.at(level))
        self.level = float(level)

    def __getattr__(self, name):
        return getattr(self.bm, name)
