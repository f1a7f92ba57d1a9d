"""Training-time model compression behind one object the trainer drives.

`Compression(cfg, model)` runs at build time, after `model.init` and before transforms and the
strategy wrap the model, so every rank applies it identically and state_dict keys are stable
from step 0:
    pruning.py  `compress.prune`: magnitude pruning masks on a sparsity schedule
    qat.py      `compress.qat`: fake-quant observers, int8 export; `compress.dynamic_quant_export`
The trainer calls `on_step(step)` before each optimizer step, folds the exported weights through
`export_state_dict()` and calls `export()` once at the end (int8 eval metrics, then the int8 files).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from ..config import Config
from ..distributed import DistContext
from ..errors import UserError, on_every_rank
from . import qat
from .pruning import Pruner, fold_pruning
from .qat import QAT, load_quantized

__all__ = ["Compression", "fold_pruning", "load_quantized"]

log = logging.getLogger("dist_train")


class Compression:
    def __init__(self, cfg: Config, model: nn.Module):
        c = cfg.compress
        self.cfg = cfg
        # QAT first: fusion swaps modules, and pruning then masks the fused (QAT) modules' weights.
        self.qat = QAT(cfg, model) if c.qat else None
        self.pruner = Pruner(cfg, model) if c.prune != "none" else None
        self.kinds = (["qat"] if c.qat else []) + (["dynamic"] if c.dynamic_quant_export else [])

    def on_step(self, step: int) -> None:
        """Before optimizer step `step` (0-based; = steps completed): switch QAT on, update masks."""
        if self.qat is not None:
            self.qat.on_step(step)
        if self.pruner is not None:
            self.pruner.on_step(step)

    def check_run_length(self, total_steps: int) -> None:
        """train.epochs ends the run at `total_steps`, before train.max_steps: QAT must start and the pruning
        ramp end within it too (the config checks hold them below train.max_steps)."""
        late, keys = [], []
        if self.qat is not None and self.qat.start >= total_steps:
            late.append(f"compress.qat_start_step ({self.qat.start}): its observers would never see a batch")
            keys.append("compress.qat_start_step")
        if self.pruner is not None and self.pruner.end >= total_steps:
            late.append(f"the pruning ramp's end (step {self.pruner.end}): its target sparsity would never be reached")
            keys.append("compress.prune_end_step")
        if late:
            raise on_every_rank(
                UserError(
                    f"train.epochs={self.cfg.train.epochs} ends the run at step {total_steps}, before "
                    f"{'; and before '.join(late)}: set {' and '.join(keys)} below {total_steps} or raise train.epochs"
                )
            )

    def probe(self, sample: torch.Tensor) -> None:
        """QAT: convert a fresh copy of the model to int8 and run it on one training input now, so that a
        model with an op that has no int8 kernel is refused at start-up, not by the export after training."""
        if self.qat is None:
            return
        cfg = self.cfg
        skeleton = qat.build_skeleton(cfg.model.name, cfg.model.kwargs, "qat", cfg.compress.qat_backend)
        try:
            int8 = qat.quantize(skeleton, "qat")  # a module without an int8 form (Embedding) fails here
            with torch.no_grad(), qat.quiet():
                int8(sample.unsqueeze(0).cpu())
        except (AssertionError, RuntimeError, NotImplementedError) as err:
            reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"compress.qat: the int8 model of {cfg.model.name!r} cannot run ({reason}): every op between its "
                "input and output needs a quantized CPU kernel (a `+` of two tensors has none, for one), "
                "or set compress.qat=false"
            ) from None

    def export_state_dict(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """Export weights under the bare model's names: masks folded in, QAT observer state dropped."""
        if tensors is None:
            return None
        if self.pruner is not None:
            tensors = fold_pruning(tensors)
        if self.qat is not None:
            tensors = qat.float_export(tensors, self.qat.renames)
        return tensors

    def exported(self, output_dir: Path) -> bool:
        """Whether every int8 model this run exports is in `output_dir` already."""
        return all((output_dir / qat.FILES[kind]).exists() for kind in self.kinds)

    def discard(self, output_dir: Path) -> None:
        """Rank 0, before a new export: remove int8 models of an earlier end (a lower train.max_steps),
        so that one left by a crash before this export completes is not taken for this step's."""
        for kind in self.kinds:
            (output_dir / qat.FILES[kind]).unlink(missing_ok=True)

    def export(self, module: nn.Module, ctx: DistContext, output_dir: Path, loss_fn, eval_data, log_row) -> None:
        """Quantize and evaluate the int8 models (collective), `log_row` their metrics, then write them
        (rank 0): the files exist only once their row is logged (`exported` then means complete)."""
        kinds = self.kinds
        if self.qat is not None and not qat.observed(module):
            if ctx.is_rank_zero:  # every rank exports alike: said once
                log.warning(
                    "compress.qat: the run ended (early stopping) before compress.qat_start_step (%d): its observers "
                    "never saw a batch, so there is no int8 model to export (model_int8.pt)",
                    self.qat.start,
                )
            kinds = [kind for kind in kinds if kind != "qat"]
        if not kinds:
            return
        cfg = self.cfg
        if ctx.world_size > 1:  # observers (and unsynced BatchNorm stats) last saw each rank's own batch:
            import torch.distributed as dist  # every rank quantizes rank 0's model, the one rank 0 saves

            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)
        state = {
            k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
            for k, v in module.state_dict().items()
        }
        if self.pruner is not None:
            state = fold_pruning(state)
        row: dict = {}
        models = {}
        for kind in kinds:
            skeleton = qat.build_skeleton(cfg.model.name, cfg.model.kwargs, kind, cfg.compress.qat_backend)
            skeleton.load_state_dict(state)
            models[kind] = qat.quantize(skeleton, kind)
            if eval_data is not None:
                metrics = qat.evaluate_quantized(models[kind], loss_fn, eval_data, ctx)
                row.update({f"{key}_{qat.SUFFIX[kind]}": value for key, value in metrics.items()})
        if row:
            log_row(row)
        for kind, int8 in models.items():
            path = output_dir / qat.FILES[kind]
            if ctx.is_rank_zero:
                qat.save_quantized(int8, path, kind, cfg)
                float_path = output_dir / "model.safetensors"
                float_mb = float_path.stat().st_size / 2**20 if float_path.exists() else float("nan")
                log.info("wrote %s (%.3f MiB; model.safetensors %.3f MiB)", path, path.stat().st_size / 2**20, float_mb)
