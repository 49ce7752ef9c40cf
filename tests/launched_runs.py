"""Several `slca train` runs in one multi-process launch (one process start, one process group), for the tests that
compare process counts: ``accelerate launch ... tests/launched_runs.py PLAN.json``. The plan is a list of
``[out_dir, [train args], stop_at]``; each run goes through the CLI as a user's does. ``stop_at`` (a stage mark,
e.g. ``fit task=2 epoch=2 batch=1``) interrupts that run there on every process as Ctrl-C would; any other
failing run stops the launch."""
import json
import sys

import slca_cli.checkpoint
import slca_cli.learner
import slca_cli.runner
import slca_cli.stages as stages
from slca_cli.cli import app

real_mark = stages.mark


def main(plan_file: str) -> None:
    for out, args, stop_at in json.loads(open(plan_file).read()):
        def mark(stage, **where):
            real_mark(stage, **where)
            if stop_at and stages.point_text(stage, where) == stop_at:
                raise KeyboardInterrupt
        for module in (slca_cli.checkpoint, slca_cli.learner, slca_cli.runner):  # where marks are made
            module.mark = mark
        code = app(["train", *map(str, args), "--out", out], standalone_mode=False)
        if bool(code) != bool(stop_at):  # a refused run's typer.Exit(2) comes back as its exit code
            sys.exit(code or 1)


if __name__ == "__main__":
    main(sys.argv[1])
