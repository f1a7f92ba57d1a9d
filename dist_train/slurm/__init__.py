"""`dist-train slurm COMMAND ...`: run dist_train as SLURM batch jobs (templates in slurm/).

submit      fill in a template from slurm/ and sbatch it (--dry-run prints it)
torchrun    torchrun that passes SIGTERM/SIGUSR1 to its ranks and exits 75 when they stopped (= dist-train torchrun)
output-dir  the folder a batch job writes to (run.output_dir as given, else config's / job id)
"""

from __future__ import annotations

from ..errors import UserError

COMMANDS = {
    "submit": "dist_train.slurm.submit:main",
    "torchrun": "dist_train.slurm.job:torchrun_main",
    "output-dir": "dist_train.slurm.job:output_dir_main",
}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not argv:
        raise UserError(f"give a command: dist-train slurm {' | '.join(COMMANDS)} ... (see --help)")
    if argv[0] not in COMMANDS:
        raise UserError(f"unknown command `dist-train slurm {argv[0]}`: choose one of {', '.join(COMMANDS)}")
    from ..imports import import_object

    return import_object(COMMANDS[argv[0]], "sub-command")(argv[1:])
