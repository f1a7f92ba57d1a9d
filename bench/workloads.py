"""The reference workloads, described once and handed to both sides of a comparison.

dist_train gets a config dict (written to YAML, run through the real CLI); the hand-written loops
get the same description as a JSON spec and build the same model and dataset from the same
factories, with the same seed, sampler order, optimizer, accumulation and clipping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


@dataclass(frozen=True)
class Workload:
    name: str
    model_factory: str  # `module:function`, the factory behind dist_train's registry name
    model_name: str  # dist_train's `model.name`
    model_kwargs: dict
    data_factory: str
    data_name: str
    data_kwargs: dict
    micro_batch_size: int
    grad_accum_steps: int
    steps: int  # optimizer steps per run
    warmup_steps: int  # steps left out of the steady-state statistics
    lr: float = 1e-3
    grad_clip_norm: float = 1.0
    weight_decay: float = 0.01  # dist_train's default; never on 1-D parameters (optim.param_groups)
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0
    log_every: int = 10  # both sides read the loss on the host every this many steps
    precision: str = "fp32"
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode (train.compile_mode)
    sdpa_backend: str = "torch"  # attention kernel tried first (train.sdpa_backend; torch: torch's order)
    fused_loss: bool = False  # the model computes its chunked loss from the targets (train.fused_loss)
    device: str = "auto"  # "cpu" keeps a one-process run off the GPU (dist_train: dist.backend=gloo)
    # The run's step time: "median" of the steady-state steps (CPU: robust to the machine's other load),
    # or "window": the median over the log_every-step windows from one step that reads the loss on the
    # host to the next, after warm-up (harness.synced_windows). On a GPU the host queues steps ahead of
    # the device, so a step's timestamp marks when it was queued; only a host read of a result is a
    # synchronised point, and the median of queued intervals overstates throughput.
    step_time: str = "median"
    strategy_options: dict = dataclasses.field(default_factory=dict)  # more `strategy.*` keys, both sides

    def __post_init__(self) -> None:
        if self.step_time == "window" and (self.warmup_steps % self.log_every or self.steps % self.log_every):
            raise ValueError(f"{self.name}: a window step time needs warmup_steps and steps multiples of log_every")

    def scaled(self, **changes) -> Workload:
        return dataclasses.replace(self, **changes)

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum_steps * world_size

    def tokens_per_sample(self) -> int:
        return self.data_kwargs.get("seq_len", 1) if self.data_name.endswith("tokens") else 1

    def spec(self, strategy: str = "ddp", zero_stage: int = 0) -> dict:
        """What a hand-written loop needs (JSON-serialisable)."""
        out = dataclasses.asdict(self)
        out.update(strategy=strategy, zero_stage=zero_stage, betas=list(self.betas))
        return out

    def dist_train_config(self, output_dir: str, strategy: str = "ddp", zero_stage: int = 0) -> dict:
        """The dist_train config of the same run: no eval, no checkpoints, no plot, plain log lines."""
        cfg = {
            "run": {"output_dir": output_dir, "seed": self.seed},
            "model": {"name": self.model_name, **self.model_kwargs},
            "data": {"name": self.data_name, **self.data_kwargs},
            "train": {
                "max_steps": self.steps,
                "micro_batch_size": self.micro_batch_size,
                "grad_accum_steps": self.grad_accum_steps,
                "lr": self.lr,
                "grad_clip_norm": self.grad_clip_norm,
                "loss": "cross_entropy",
                "precision": self.precision,
                "compile": self.compile,
                "compile_mode": self.compile_mode,
                "sdpa_backend": self.sdpa_backend,
                "fused_loss": self.fused_loss,
            },
            "optim": {"name": "adamw", "weight_decay": self.weight_decay, "betas": list(self.betas), "eps": self.eps},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "strategy": {"name": strategy},
            "eval": {"every_steps": None, "at_end": False},
            "checkpoint": {"every_steps": None, "at_end": False, "resume": "never"},
            "log": {"every_steps": self.log_every, "progress": "lines", "plot": False},
        }
        cfg["strategy"].update(self.strategy_options)
        if strategy == "deepspeed":
            cfg["strategy"]["zero_stage"] = zero_stage
        if self.device == "cpu":
            cfg["dist"] = {"backend": "gloo"}
        return cfg


LM = Workload(
    name="transformer_lm",
    model_factory="dist_train.models.transformer_lm:transformer_lm",
    model_name="transformer_lm",
    model_kwargs={"vocab_size": 256, "seq_len": 64, "d_model": 128, "n_layers": 4, "n_heads": 4},
    data_factory="dist_train.data.synthetic:synthetic_tokens",
    data_name="synthetic_tokens",
    data_kwargs={"vocab_size": 256, "seq_len": 64, "num_samples": 4096, "eval_samples": 0},
    micro_batch_size=8,
    grad_accum_steps=2,
    steps=50,
    warmup_steps=10,
)

RESNET = Workload(
    name="resnet",
    model_factory="dist_train.models.resnet:resnet",
    model_name="resnet",
    model_kwargs={"widths": [16, 32, 64], "num_classes": 10},
    data_factory="dist_train.data.synthetic:synthetic_images",
    data_name="synthetic_images",
    data_kwargs={"num_classes": 10, "image_size": 16, "num_samples": 4096, "eval_samples": 0},
    micro_batch_size=16,
    grad_accum_steps=2,
    steps=150,  # ~20 ms steps: a 3 s steady-state window, like transformer_lm's 40 x ~90 ms
    warmup_steps=20,
)

WORKLOADS = {w.name: w for w in (LM, RESNET)}


def quick(workload: Workload) -> Workload:
    """`--quick`: a third of the steps (at least 20), 5 of them warm-up."""
    return workload.scaled(steps=max(20, workload.steps // 3), warmup_steps=5)


def smoke(workload: Workload) -> Workload:
    """`--smoke` (tests): tiny model, a handful of steps; checks the harness, not the speed."""
    if workload.name == "transformer_lm":
        return workload.scaled(
            model_kwargs={"vocab_size": 64, "seq_len": 16, "d_model": 32, "n_layers": 2, "n_heads": 2},
            data_kwargs={"vocab_size": 64, "seq_len": 16, "num_samples": 512, "eval_samples": 0},
            micro_batch_size=4,
            steps=8,
            warmup_steps=2,
            log_every=4,
        )
    return workload.scaled(
        model_kwargs={"widths": [8, 16], "num_classes": 4},
        data_kwargs={"num_classes": 4, "image_size": 8, "num_samples": 512, "eval_samples": 0},
        micro_batch_size=4,
        steps=8,
        warmup_steps=2,
        log_every=4,
    )
