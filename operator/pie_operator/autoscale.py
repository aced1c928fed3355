"""Replica autoscaling as a pure policy: (policy, desired replicas, pods' load, window state, now) -> decision.

Two loops, one policy: memory first, then replicas. An engine absorbs more load by expanding -- moving KV layers to
host memory, with the memory loop growing its host request -- which is cheap and takes seconds; a replica costs a GPU
and minutes (scheduling, image, weights, warm-up). So replicas are added only when expansion cannot help any more: on
EVERY serving pod expansion is exhausted (host memory at hostMemory.max, the adaptive controller at its ceiling or
backing off on latency; the caller judges that per pod) AND the target is missed over the whole scale-up window. They
are removed when the others could hold the load within the target at their current expansion -- the aggregate times
n / (n - k) at most `scale_down_headroom` x target, over the whole scale-down window -- and only by draining (stop
routing, let in-flight requests finish, then delete): the decision names the pods, emptiest first.

Rules, in order:
1. Bounds: desired replicas outside [min, max] move to the bound at once (the policy changed), by draining for max.
   Give back: a replica not Ready `ready_timeout` after its creation (no free GPU) goes, down to min: rule 2 would
   otherwise wait for it for ever.
2. Settling: a pod draining, a replica not created or not Ready yet, or more pods than replicas -> hold: the last change
   has not landed, and samples taken meanwhile describe neither the old size nor the new one.
3. Evidence: an active pod without a fresh sample or without the target's signal -> hold (an unscraped pod may be the
   busiest; no evidence never causes a change, as in decisions.py).
4. Up, else down, each once its window is full; any other outcome is a hold that says why.

Aggregates: QueueDepth = waiting requests per serving replica; TTFT / TPOT = the worst pod's p95 (what the unluckiest
users see). Under an even spread both grow like 1 / replicas, hence the n / (n - k) projection; a latency grows faster
than that near saturation, which the headroom is for.

The windows are explicit state (since when each condition held, continuously), kept by the caller next to the desired
replicas and passed back. A lapse of the condition, a gap between evaluations longer than a sample stays fresh (nobody
watched), a change, settling or missing evidence restarts them. Same inputs, same decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

QUEUE_DEPTH, TTFT, TPOT = "QueueDepth", "TTFT", "TPOT"
TARGETS = (QUEUE_DEPTH, TTFT, TPOT)
# Decision reasons (status.autoscaling.reason; status.decisions[].reason of a change of the count).
SCALE_UP, SCALE_DOWN, BOUNDS, SETTLING, NO_METRICS, HOLD, GIVE_BACK = (
    "ScaleUp", "ScaleDown", "Bounds", "Settling", "NoMetrics", "Hold", "GiveBack")


@dataclass(frozen=True)
class AutoscalePolicy:
    """The knobs. `target_value`: waiting requests per replica (QueueDepth) or p95 seconds (TTFT, TPOT)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target: str = QUEUE_DEPTH
    target_value: float = 4.0
    scale_up_window: float = 60.0
    scale_down_window: float = 300.0
    max_scale_up_step: int = 1
    max_scale_down_step: int = 1
    scale_down_headroom: float = 0.7  # the survivors must stay this far below the target, or the next step undoes it
    max_sample_age: float = 60.0  # an older sample is no evidence
    # A replica not Ready this long after its creation is given back (above min_replicas): no GPU was free for it, or
    # it cannot start. Settling waits for every replica, so holding for one that never comes would block every
    # later decision, scale-downs included.
    ready_timeout: float = 600.0
    scale_to_zero: bool = False

    def __post_init__(self) -> None:
        bad = []
        if self.min_replicas < 1:
            bad.append(f"min_replicas must be >= 1 (got {self.min_replicas})")
        if self.max_replicas < self.min_replicas:
            bad.append(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.target not in TARGETS:
            bad.append(f"target must be one of {', '.join(TARGETS)} (got {self.target!r})")
        if not 0 < self.target_value < math.inf:
            bad.append(f"target_value must be a finite number > 0 (got {self.target_value})")
        for name in ("scale_up_window", "scale_down_window"):
            if not 0 <= getattr(self, name) < math.inf:
                bad.append(f"{name} must be a finite number of seconds >= 0 (got {getattr(self, name)})")
        for name in ("max_scale_up_step", "max_scale_down_step"):
            if getattr(self, name) < 1:
                bad.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 < self.scale_down_headroom <= 1:
            bad.append(f"scale_down_headroom must be in (0, 1] (got {self.scale_down_headroom})")
        if not 0 < self.ready_timeout < math.inf:
            bad.append(f"ready_timeout must be a finite number of seconds > 0 (got {self.ready_timeout})")
        if not 0 < self.max_sample_age < math.inf:
            bad.append(f"max_sample_age must be a finite number of seconds > 0 (got {self.max_sample_age})")
        if self.scale_to_zero:
            # With no replica left no engine reports the load that should bring one back: that needs a request
            # signal from in front of the pods (the router), which this policy does not have.
            bad.append("scale_to_zero is not supported yet: with no replica nothing measures the load to wake one")
        if bad:
            raise ValueError("invalid autoscale policy: " + "; ".join(bad))


@dataclass(frozen=True)
class PodLoad:
    """One pod as the policy sees it: the latest scrape of its engine (`at` None: never scraped) and its state."""

    name: str
    ready: bool
    draining: bool = False  # routing stopped, in-flight requests finishing: already leaving
    in_flight: int = 0  # pie_num_requests_running
    waiting: int = 0  # pie_num_requests_waiting
    ttft_p95: float | None = None  # seconds; None: no request finished recently
    tpot_p95: float | None = None
    expansion_exhausted: bool = False
    expansion: str = ""  # how far it expanded, for messages (e.g. "1.5x of max 3x")
    at: float | None = None
    created: float | None = None  # the pod's creation time (None: unknown)


@dataclass(frozen=True)
class AutoscaleState:
    """The windows: since when each condition held continuously (None: it does not hold), as of evaluation `at`."""

    up_since: float | None = None  # target missed with expansion exhausted on every pod
    down_since: float | None = None  # one replica fewer would hold the load within the headroom
    at: float | None = None


@dataclass(frozen=True)
class Decision:
    replicas: int  # desired replicas
    drain: tuple[str, ...]  # pods to drain (stop routing, finish in-flight requests, then delete)
    reason: str  # ScaleUp | ScaleDown | Bounds | Settling | NoMetrics | Hold
    message: str
    state: AutoscaleState


def _names(names: Sequence[str]) -> str:
    return ", ".join(names)


def _emptiest(pods: Sequence[PodLoad], k: int) -> tuple[str, ...]:
    """The `k` pods whose drain costs least: not Ready ones (they serve nothing), then fewest in flight, then name."""
    return tuple(x.name for x in sorted(pods, key=lambda x: (x.ready, x.in_flight, x.name))[:max(k, 0)])


def _signal(pod: PodLoad, target: str) -> float | None:
    if target == QUEUE_DEPTH:
        return float(pod.waiting)
    p95 = pod.ttft_p95 if target == TTFT else pod.tpot_p95
    if p95 is None and pod.in_flight == 0 and pod.waiting == 0:
        return 0.0  # idle: no latency to report, and nothing that could miss a target
    return p95


def _missing(pod: PodLoad, p: AutoscalePolicy, now: float) -> str | None:
    if pod.at is None:
        return f"{pod.name} (not scraped yet)"
    if now - pod.at > p.max_sample_age:
        return f"{pod.name} (sample {now - pod.at:g}s old)"
    if _signal(pod, p.target) is None:
        return f"{pod.name} (no {p.target} p95 while serving)"
    return None


def _describe(value: float, p: AutoscalePolicy) -> str:
    if p.target == QUEUE_DEPTH:
        return f"queue depth {value:.3g}/replica (target {p.target_value:g})"
    return f"{p.target} p95 {value:.3g}s (target {p.target_value:g}s)"


def _fewer(value: float, n: int, p: AutoscalePolicy) -> int:
    """How many replicas could go at once: the others keep the aggregate (x n / (n - k)) within the headroom."""
    limit = p.scale_down_headroom * p.target_value
    return max((k for k in range(1, min(p.max_scale_down_step, n - p.min_replicas) + 1)
                if value * n / (n - k) <= limit), default=0)


def _unsettled(p: AutoscalePolicy, replicas: int, pods: Sequence[PodLoad], now: float) -> tuple[str, str] | None:
    """Rules 2 and 3 (settling, evidence): (reason, message) of a hold, or None: the load can be judged."""
    active = [x for x in pods if not x.draining]
    if leaving := sorted(x.name for x in pods if x.draining):
        return SETTLING, f"waiting for {_names(leaving)} to drain before the next decision"
    if len(active) < replicas:
        return SETTLING, f"waiting for {replicas - len(active)} of {replicas} replica(s) to be created"
    if unready := sorted(x.name for x in active if not x.ready):
        return SETTLING, f"waiting for {_names(unready)} to become Ready"
    if len(active) > replicas:
        return SETTLING, f"{len(active)} pods for {replicas} replica(s): waiting for the extra ones to go"
    if missing := [m for x in sorted(active, key=lambda x: x.name) if (m := _missing(x, p, now)) is not None]:
        return NO_METRICS, f"no fresh {p.target} signal from {_names(missing)}: holding"
    return None


def _aggregate(p: AutoscalePolicy, active: Sequence[PodLoad]) -> float:
    """The load the target is compared with (module docstring: aggregates); every pod has its signal."""
    values = [v for x in active if (v := _signal(x, p.target)) is not None]
    return sum(values) / len(active) if p.target == QUEUE_DEPTH else max(values)


def recommend(policy: AutoscalePolicy, replicas: int, pods: Sequence[PodLoad], now: float) -> int:
    """The replicas the policy would want at this instant, with no window and no step (an HPA or KEDA scaling on it
    applies its own stabilization): memory first as in `decide`, within [min, max]. While settling or without
    evidence: `replicas` (no evidence never causes a change -- nor, through an external autoscaler, a scale-down)."""
    p, active = policy, [x for x in pods if not x.draining]
    n = len(active)
    if _unsettled(p, replicas, pods, now) is not None or n == 0:
        want = replicas
    elif (value := _aggregate(p, active)) > p.target_value:
        exhausted = all(x.expansion_exhausted for x in active)
        want = max(math.ceil(n * value / p.target_value), n + 1) if exhausted else n
    else:
        want = n - _fewer(value, n, replace(p, max_scale_down_step=n))
    return min(max(want, p.min_replicas), p.max_replicas)


def decide(policy: AutoscalePolicy, replicas: int, pods: Sequence[PodLoad], state: AutoscaleState,
           now: float) -> Decision:
    """The next desired replicas (module docstring: the rules). `replicas`: the desired count now; `pods`: the live
    pods, draining ones included; `state`: the previous decision's."""
    p, active = policy, [x for x in pods if not x.draining]

    def hold(reason: str, message: str, st: AutoscaleState = AutoscaleState()) -> Decision:
        return Decision(replicas, (), reason, message, st)

    if replicas < p.min_replicas:
        return Decision(p.min_replicas, (), BOUNDS, f"{replicas} replica(s) is below min_replicas: "
                        f"{replicas} -> {p.min_replicas}", AutoscaleState())
    if replicas > p.max_replicas:
        drain = _emptiest(active, len(active) - p.max_replicas)
        return Decision(p.max_replicas, drain, BOUNDS, f"{replicas} replica(s) is above max_replicas: {replicas} -> "
                        f"{p.max_replicas}" + (f", draining {_names(drain)}" if drain else ""), AutoscaleState())
    stuck = sorted(x.name for x in active if not x.ready and x.created is not None
                   and now - x.created >= p.ready_timeout)[:max(0, replicas - p.min_replicas)]
    if stuck:
        return Decision(replicas - len(stuck), tuple(stuck), GIVE_BACK, f"{_names(stuck)} not Ready "
                        f"{p.ready_timeout:g}s after creation (no free GPU, or it cannot start): giving the "
                        f"replica(s) back: {replicas} -> {replicas - len(stuck)}", AutoscaleState())
    if (why := _unsettled(p, replicas, pods, now)) is not None:
        return hold(*why)

    n, value = len(active), _aggregate(p, active)
    what = _describe(value, p)
    missed = value > p.target_value
    expandable = sorted((x for x in active if not x.expansion_exhausted), key=lambda x: x.name)
    up, fewer = missed and not expandable, 0 if missed else _fewer(value, n, p)
    watched = state.at is not None and 0 <= now - state.at <= p.max_sample_age  # else continuity is unknown
    up_since = (state.up_since if watched and state.up_since is not None else now) if up else None
    down_since = (state.down_since if watched and state.down_since is not None else now) if fewer else None
    st = AutoscaleState(up_since, down_since, now)

    if up_since is not None:
        held = now - up_since
        if n >= p.max_replicas:
            return hold(HOLD, f"{what} with expansion exhausted on every pod, but at max_replicas {p.max_replicas}", st)
        if held < p.scale_up_window:
            return hold(HOLD, f"{what} with expansion exhausted on every pod for {held:.0f}s of the "
                        f"{p.scale_up_window:g}s scale-up window", st)
        want = math.ceil(n * value / p.target_value)
        new = min(max(want, n + 1), n + p.max_scale_up_step, p.max_replicas)
        capped = f" (wanted {want}, capped by max_scale_up_step / max_replicas)" if new < want else ""
        return Decision(new, (), SCALE_UP, f"{what} for {held:.0f}s with expansion exhausted on every pod: "
                        f"{n} -> {new} replicas{capped}", AutoscaleState())
    if missed:
        x = expandable[0]
        return hold(HOLD, f"expansion can still absorb the load: {x.name} "
                    f"{'at ' + x.expansion if x.expansion else 'can expand further'} ({what})", st)
    if down_since is not None:
        held = now - down_since
        if held < p.scale_down_window:
            return hold(HOLD, f"{what}: {n - 1} replica(s) would hold it, for {held:.0f}s of the "
                        f"{p.scale_down_window:g}s scale-down window", st)
        drain = _emptiest(active, fewer)
        return Decision(n - fewer, drain, SCALE_DOWN, f"{what} for {held:.0f}s: {n - fewer} replica(s) hold it within "
                        f"{p.scale_down_headroom:.0%} of the target: {n} -> {n - fewer}, draining {_names(drain)}",
                        AutoscaleState())
    if n <= p.min_replicas:
        return hold(HOLD, f"{what}: target met at min_replicas {p.min_replicas}", st)
    return hold(HOLD, f"{what}: target met, and {n - 1} replica(s) would exceed {p.scale_down_headroom:.0%} of it", st)
