"""Auto-scaling from the average freeness (Llumnix paper, Section 4.4.3).

``freeness`` (default), evaluated once per scheduling round:

- ``avg`` = mean migration freeness over the non-terminating instances. An empty
  instance has ``B_i = 1`` (see ``virtual_usage``), so its freeness is its
  unreserved blocks: large but finite, and it pulls the average up as it should.
- Fewer non-terminating instances than ``min_instances``: scale OUT now.
- ``avg < scale_out_threshold`` for ``scale_period_rounds`` consecutive rounds and
  fewer than ``max_instances`` instances (terminating ones included: they still hold
  their hardware): scale OUT.
- ``avg > scale_in_threshold`` for the period, more than ``min_instances``
  non-terminating instances and no instance already terminating: scale IN the
  non-terminating instance with the fewest running requests, ties by fewest queued,
  then the highest instance_id (ids sort in launch order, so the oldest stay).
- A round where neither condition holds resets both counters; an action resets its
  counter, so the next one needs a whole new period. A condition that holds while
  its action is blocked (at a bound, or draining) keeps counting, so the action
  fires as soon as it is allowed.

``none`` never scales (a null object for a fixed-size cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from llumnix_py.load import InstanceLoad
from policies.config import PolicyConfig
from policies.registry import SCALING
from policies.types import ScaleAction, ScaleDecision
from policies.virtual_usage import freeness

ScalingFn = Callable[[Sequence[InstanceLoad], PolicyConfig, "ScalingState"], ScaleDecision]


@dataclass
class ScalingState:
    """Consecutive rounds each scaling condition has held; owned by the caller.

    Attributes:
        out_rounds: rounds in a row with average freeness below the scale-out threshold.
        in_rounds: rounds in a row with average freeness above the scale-in threshold.
    """

    out_rounds: int = 0
    in_rounds: int = 0

    def reset(self) -> None:
        self.out_rounds = 0
        self.in_rounds = 0


def average_freeness(instances: Sequence[InstanceLoad], cfg: PolicyConfig) -> Optional[float]:
    """Mean migration freeness of the non-terminating instances (``None`` if none)."""
    values = [freeness(inst, cfg, purpose="migration") for inst in instances if not inst.terminating]
    return sum(values) / len(values) if values else None


def decide_scaling(instances: Sequence[InstanceLoad], cfg: PolicyConfig, state: ScalingState) -> ScaleDecision:
    """This round's scaling decision under ``cfg.scaling``; updates ``state``.

    Raises:
        UnknownPolicyError: ``cfg.scaling`` is not registered.
    """
    return SCALING.get(cfg.scaling)(instances, cfg, state)


def scale_by_freeness(instances: Sequence[InstanceLoad], cfg: PolicyConfig, state: ScalingState) -> ScaleDecision:
    """The paper's rule (module docstring)."""
    active = [inst for inst in instances if not inst.terminating]
    draining = len(instances) - len(active)
    if len(active) < cfg.min_instances:
        state.reset()
        if len(instances) >= cfg.max_instances:
            return ScaleDecision(ScaleAction.NONE, reason="below min_instances but at max_instances")
        return ScaleDecision(
            ScaleAction.OUT, reason=f"{len(active)} active instances < min_instances {cfg.min_instances}"
        )
    avg = average_freeness(active, cfg)
    assert avg is not None  # active is non-empty: min_instances >= 1
    if avg < cfg.scale_out_threshold:
        state.out_rounds += 1
        state.in_rounds = 0
    elif avg > cfg.scale_in_threshold:
        state.in_rounds += 1
        state.out_rounds = 0
    else:
        state.reset()
        return ScaleDecision(ScaleAction.NONE, reason=f"average freeness {avg:.1f} within thresholds")
    period = cfg.scale_period_rounds
    if state.out_rounds:
        if state.out_rounds < period:
            return ScaleDecision(
                ScaleAction.NONE, reason=f"average freeness {avg:.1f} low for {state.out_rounds}/{period} rounds"
            )
        if len(instances) >= cfg.max_instances:
            return ScaleDecision(ScaleAction.NONE, reason=f"would scale out but at max_instances {cfg.max_instances}")
        state.out_rounds = 0
        return ScaleDecision(
            ScaleAction.OUT,
            reason=f"average freeness {avg:.1f} < {cfg.scale_out_threshold} for {period} rounds",
        )
    if state.in_rounds < period:
        return ScaleDecision(
            ScaleAction.NONE, reason=f"average freeness {avg:.1f} high for {state.in_rounds}/{period} rounds"
        )
    if len(active) <= cfg.min_instances:
        return ScaleDecision(ScaleAction.NONE, reason=f"would scale in but at min_instances {cfg.min_instances}")
    if draining:
        return ScaleDecision(ScaleAction.NONE, reason="would scale in but an instance is already terminating")
    victim = min(active, key=_scale_in_key)
    state.in_rounds = 0
    return ScaleDecision(
        ScaleAction.IN,
        instance_id=victim.instance_id,
        reason=(
            f"average freeness {avg:.1f} > {cfg.scale_in_threshold} for {period} rounds; "
            f"{victim.instance_id} has {victim.num_running} running"
        ),
    )


def _scale_in_key(inst: InstanceLoad) -> tuple[int, int, "_Desc"]:
    return (inst.num_running, inst.num_waiting, _Desc(inst.instance_id))


class _Desc:
    """Reverses string order inside a sort key (highest id first)."""

    __slots__ = ("s",)

    def __init__(self, s: str) -> None:
        self.s = s

    def __lt__(self, other: "_Desc") -> bool:
        return self.s > other.s

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.s == other.s


def scale_never(instances: Sequence[InstanceLoad], cfg: PolicyConfig, state: ScalingState) -> ScaleDecision:
    """Fixed-size cluster: never scale."""
    return ScaleDecision(ScaleAction.NONE, reason="scaling disabled")
