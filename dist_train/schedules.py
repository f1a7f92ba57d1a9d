"""Learning-rate schedules.

Every schedule is `lr_at(cfg, step, scale)`: a pure function of the config and the optimizer step,
times `scale`, which is 1 except under `plateau`. Reduce-on-plateau is the one schedule with state:
`LRSchedule` keeps its scale, best metric and counters, is updated after each evaluation from the
cross-rank eval metrics (identical on every rank, so every rank changes the LR at the same step),
and its state travels in the checkpoint's trainer state (`TrainState.lr_schedule`, JSON), so a
resumed run continues the same decisions.
"""

from __future__ import annotations

import bisect
import copy
import logging
import math
from dataclasses import asdict, dataclass

from .config import Config
from .errors import UserError

log = logging.getLogger("dist_train")


def lr_at(cfg: Config, step: int, scale: float = 1.0) -> float:
    """LR used by optimizer step `step` (0-based): warm-up, then the named schedule, times `scale`."""
    s, peak, total = cfg.schedule, cfg.train.lr, cfg.train.max_steps
    if step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps * scale
    if s.name in ("constant", "plateau"):
        return peak * scale
    if s.name == "step":
        return peak * s.gamma ** ((step - s.warmup_steps) // s.step_size) * scale
    if s.name == "multistep":  # milestones are absolute optimizer steps: decayed from step index m on
        return peak * s.gamma ** bisect.bisect_right(s.milestones, step) * scale
    progress = min(1.0, (step - s.warmup_steps) / max(1, total - 1 - s.warmup_steps))
    floor = peak * s.min_lr_ratio
    if s.name == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def max_steps_change(cfg: Config, written_max_steps, step: int) -> str | None:
    """What a changed `train.max_steps` does to a `linear`/`cosine` schedule resumed at optimizer step
    `step` (0-based) from a checkpoint written under `written_max_steps`: the decay is stretched or
    squeezed to the new end, so the LR moves at once (silently: max_steps is not in the config hash).
    None when the LR of that step is unchanged (another schedule, warm-up, the same max_steps)."""
    if not isinstance(written_max_steps, int) or written_max_steps == cfg.train.max_steps:
        return None
    if cfg.schedule.name not in ("linear", "cosine"):
        return None
    before = copy.deepcopy(cfg)
    before.train.max_steps = written_max_steps
    old, new = lr_at(before, step), lr_at(cfg, step)
    if math.isclose(old, new, rel_tol=1e-9, abs_tol=0.0):
        return None
    return (
        f"train.max_steps changed from {written_max_steps} to {cfg.train.max_steps}: the {cfg.schedule.name} "
        f"schedule now decays to step {cfg.train.max_steps}, so step {step + 1} trains at LR {new:.3g}, where the "
        f"run that wrote the checkpoint went on at {old:.3g}"
    )


@dataclass
class PlateauState:
    """ReduceLROnPlateau's state, in units of the peak LR (JSON in the checkpoint manifest)."""

    scale: float = 1.0  # the LR is train.lr x scale (x the warm-up ramp)
    best: float | None = None
    bad_evals: int = 0  # evaluations in a row without improvement
    cooldown_left: int = 0
    reductions: int = 0
    watched: str | None = None  # "metric mode" that best and bad_evals belong to


class LRSchedule:
    """The LR for each step; `observe()` feeds it each evaluation's metrics (plateau only).

    Plateau follows torch.optim.lr_scheduler.ReduceLROnPlateau (threshold_mode `rel`, eps 1e-8) with
    evaluations for epochs: improvement means `value < best * (1 - threshold)` (`min`) or
    `value > best * (1 + threshold)` (`max`); after more than `plateau_patience` evaluations in a
    row without one, the LR is multiplied by `plateau_factor` (not below `min_lr`), then
    `plateau_cooldown` evaluations are not counted.
    """

    EPS = 1e-8

    def __init__(self, cfg: Config, state: dict | None = None):
        self.cfg = cfg
        s = cfg.schedule
        self.plateau = s.name == "plateau"
        self.metric = s.plateau_metric or cfg.eval.metric
        self.mode = s.plateau_mode or cfg.eval.mode
        # only plateau reads its state: another schedule resuming a plateau checkpoint starts at scale 1, as
        # the checkpoints it writes (no state) make it start again after an interruption
        self.state = PlateauState(**(state or {})) if self.plateau else PlateauState()

    def lr_at(self, step: int) -> float:
        return lr_at(self.cfg, step, self.state.scale)

    def observe(self, metrics: dict, step: int) -> dict:
        """Update from one evaluation (after optimizer step `step`); returns the state for TrainState."""
        if not self.plateau:
            return self.state_dict()
        if self.metric not in metrics:
            raise UserError(
                f"schedule.plateau_metric {self.metric!r} is not among the eval metrics ({', '.join(metrics)})"
            )
        value, st, s = float(metrics[self.metric]), self.state, self.cfg.schedule
        watched = f"{self.metric} {self.mode}"
        if st.watched not in (None, watched):  # the checkpoint's best is another metric's (or mode's): count afresh
            st.best, st.bad_evals = None, 0
        st.watched = watched
        if self._better(value, st.best):
            st.best, st.bad_evals = value, 0
        else:
            st.bad_evals += 1
        if st.cooldown_left > 0:
            st.cooldown_left -= 1
            st.bad_evals = 0
        if st.bad_evals > s.plateau_patience:
            peak = self.cfg.train.lr
            new_scale = max(st.scale * s.plateau_factor, s.min_lr / peak)
            if peak * (st.scale - new_scale) > self.EPS:
                st.scale, st.reductions = new_scale, st.reductions + 1
                log.info("step %d: %s plateaued, LR reduced to %.3g", step, self.metric, peak * new_scale)
            st.cooldown_left, st.bad_evals = s.plateau_cooldown, 0
        return self.state_dict()

    def _better(self, value: float, best: float | None) -> bool:
        threshold = self.cfg.schedule.plateau_threshold
        if best is None:  # torch starts from best = inf (min) or -inf (max): a NaN first value is no improvement
            best = math.inf if self.mode == "min" else -math.inf
        if self.mode == "min":
            return value < best * (1.0 - threshold)
        return value > best * (1.0 + threshold)

    def state_dict(self) -> dict:
        return asdict(self.state) if self.plateau else {}
