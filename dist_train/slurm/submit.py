"""`dist-train slurm submit`: fill in a template from slurm/ and hand it to sbatch.

    dist-train slurm submit --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition gpu CONFIG [KEY=VALUE ...]

The template follows from the request: `--launcher srun` -> srun.sbatch (one task per rank);
torchrun (the default) -> cpu.sbatch (one node, no GPUs), single_node.sbatch (one node) or
multi_node.sbatch. Its #SBATCH lines get the requested resources and the config and overrides are
written into the script, so `--dry-run` prints a complete job script (`--dry-run > job.sbatch`,
then `sbatch job.sbatch` submits the same job). The config is checked before anything is submitted.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from ..cli import ArgParser
from ..errors import UserError
from .job import output_dir_for_job

# slurm/ of the checkout, linked into the package (dist_train/slurm/templates) so that a wheel ships it
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
CPUS_PER_GPU_RANK = 8  # default --cpus-per-task share of a GPU rank (data loading, host work)


def _parser() -> ArgParser:
    parser = ArgParser(prog="dist-train slurm submit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one rank each (default 0: CPU)")
    parser.add_argument("--nproc-per-node", type=int, default=None, help="CPU runs: ranks per node (default 1)")
    parser.add_argument("--launcher", choices=("torchrun", "srun"), default="torchrun", help="default torchrun")
    parser.add_argument("--time", default=None, help="time limit, SLURM syntax (default: the template's)")
    parser.add_argument("--partition", default=None, help="default: the cluster's default partition")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="default: 8 per GPU rank, 1 per CPU rank")
    parser.add_argument("--job-name", default=None, help="default: the config file's name")
    parser.add_argument("--signal-grace", type=int, default=300, help="seconds before the time limit to checkpoint")
    parser.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH option: --sbatch-arg=--qos=high",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the job script instead of submitting it")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return parser


def time_limit_seconds(text: str) -> int | None:
    """SLURM's --time syntax (`M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`) in seconds; None: unlimited."""
    if text.lower() in ("infinite", "unlimited", "0"):  # SLURM: --time=0 is no limit
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise UserError(f"--time {text!r} is not a SLURM time limit: use minutes, H:M:S or D-H:M:S")
    days, first, second, third = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-H[:M[:S]]
        hours, minutes, seconds = first, second or 0, third or 0
    elif third is not None:  # H:M:S
        hours, minutes, seconds = first, second, third
    else:  # M or M:S
        hours, minutes, seconds = 0, first, second or 0
    return (((days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def pick_template(nodes: int, gpus_per_node: int, launcher: str) -> str:
    if launcher == "srun":
        return "srun"
    if nodes > 1:
        return "multi_node"
    return "single_node" if gpus_per_node else "cpu"


def _sbatch_line(key: str, value: str) -> str:
    """sbatch reads an #SBATCH line's words as a shell does (quotes, `#` starts a comment): a value
    with a space or a `#` (a config named `my exp.yaml`) is quoted, or sbatch refuses the script."""
    return f"#SBATCH {key}={shlex.quote(value)}" if value else f"#SBATCH {key}"


def _sbatch_options(script: str) -> dict[str, str]:
    """The `#SBATCH --KEY=VALUE` lines of a job script, values unquoted."""
    lines = re.findall(r"^#SBATCH (--[\w-]+=.*)$", script, re.MULTILINE)
    return dict(shlex.split(line, comments=True)[0].split("=", 1) for line in lines)


def render(template: str, options: dict[str, str | None], prologue: list[str]) -> str:
    """Set the `#SBATCH --KEY=...` line of every KEY in `options` (None drops it; keys the template
    lacks are added after its last #SBATCH line), then insert `prologue` after the #SBATCH block."""
    lines = template.splitlines()
    sbatch_lines = [i for i, line in enumerate(lines) if line.startswith("#SBATCH ")]
    if not sbatch_lines:
        raise UserError("the template has no #SBATCH lines")
    out, seen = [], set()
    for i, line in enumerate(lines):
        key = line.split()[1].split("=")[0] if i in sbatch_lines else None
        if key in options:
            seen.add(key)
            if options[key] is not None:
                out.append(_sbatch_line(key, options[key]))
        else:
            out.append(line)
        if i == sbatch_lines[-1]:
            out += [_sbatch_line(key, value) for key, value in options.items() if key not in seen and value is not None]
            out += ["", *prologue]
    return "\n".join(out) + "\n"


def build_script(args) -> tuple[str, str, str]:
    """Check the request; return the template's name, the job script and the config's output_dir."""
    if args.nodes < 1:
        raise UserError(f"--nodes must be at least 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node must be 0 (CPU) or more, got {args.gpus_per_node}")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    if args.gpus_per_node and args.nproc_per_node not in (None, args.gpus_per_node):
        raise UserError("--nproc-per-node is for CPU runs: with --gpus-per-node, every node runs one rank per GPU")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task must be at least 1, got {args.cpus_per_task}")
    if args.signal_grace < 1:
        raise UserError(f"--signal-grace must be at least 1 second, got {args.signal_grace}")
    config = Path(args.config)
    if not config.is_file():
        raise UserError(f"config file not found: {args.config}")
    from ..config import load_config

    cfg = load_config(config, args.overrides)  # a bad config or override fails here, not in the queue

    ranks_per_node = args.gpus_per_node or args.nproc_per_node or 1
    ranks_per_task = 1 if args.launcher == "srun" else ranks_per_node
    cpus = args.cpus_per_task or ranks_per_task * (CPUS_PER_GPU_RANK if args.gpus_per_node else 1)
    options: dict[str, str | None] = {
        "--job-name": args.job_name or config.stem,
        "--nodes": str(args.nodes),
        "--ntasks-per-node": str(1 if args.launcher == "torchrun" else ranks_per_node),
        "--gpus-per-node": str(args.gpus_per_node) if args.gpus_per_node else None,
        "--cpus-per-task": str(cpus),
        "--signal": f"B:USR1@{args.signal_grace}",
    }
    if args.time:
        options["--time"] = args.time
    if args.partition:
        options["--partition"] = args.partition
    for extra in args.sbatch_arg:
        key, sep, value = extra.partition("=")
        if not key.startswith("--") or (sep and not value):
            raise UserError(f"--sbatch-arg {extra!r} must look like --option=value or --flag (e.g. --qos=high)")
        options[key] = value  # "" for a flag such as --exclusive
    name = pick_template(args.nodes, args.gpus_per_node, args.launcher)
    template = TEMPLATE_DIR / f"{name}.sbatch"
    if not template.is_file():
        raise UserError(f"SLURM template {template} not found: reinstall dist-train (its package ships the templates)")
    # the job's time limit, wherever it comes from (--time, --sbatch-arg=--time=..., the template's line)
    own = re.search(r"^#SBATCH\s+--time[= ](\S+)", template.read_text(), re.M)
    time = options.get("--time") or (own.group(1) if own else None)
    limit = time_limit_seconds(time) if time else None
    # the grace the job gets: --signal-grace, unless --sbatch-arg=--signal=[B:]SIG[@SECONDS] replaced its line
    grace, grace_from = args.signal_grace, f"--signal-grace {args.signal_grace}"
    given = re.fullmatch(r"(?:[RB]+:)?\w+(?:@(\d+))?", options["--signal"] or "")
    if given and options["--signal"] != f"B:USR1@{args.signal_grace}":
        grace, grace_from = int(given.group(1) or 60), f"--sbatch-arg=--signal={options['--signal']}"  # SLURM: 60
    if limit is not None and limit <= grace:
        raise UserError(
            f"a time limit of {time} leaves no room for {grace_from}: the job would be told "
            "to stop (and requeue itself) as it starts; raise --time or lower --signal-grace"
        )
    prologue = [
        "# Filled in by `dist-train slurm submit`; arguments given to sbatch replace these.",
        f"[ $# -gt 0 ] || set -- {shlex.join([str(config.resolve()), *args.overrides])}",
    ]
    if args.launcher == "torchrun":
        prologue.append(f"export DIST_TRAIN_NPROC_PER_NODE={ranks_per_node}")
    return name, render(template.read_text(), options, prologue), cfg.run.output_dir


def main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)  # overrides before and after options, as check/verify
    name, script, output_dir = build_script(args)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("sbatch not found on PATH: submit from a SLURM login node, or print the script with --dry-run")
    proc = subprocess.run([sbatch, "--parsable"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        message = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise UserError(f"sbatch refused the job ({name}.sbatch): {message}")
    job_id = proc.stdout.strip().split(";")[0]
    options = _sbatch_options(script)
    log = options.get("--output", "slurm-%j.out").replace("%x", options.get("--job-name", "")).replace("%j", job_id)
    run_dir = output_dir_for_job(output_dir, args.overrides, job_id)
    print(f"Submitted batch job {job_id} ({name}.sbatch): run folder {run_dir}, log {log}")
    return 0
