"""Several `slca train` runs in one multi-process launch (one process start, one process group), for the tests that
compare process counts: ``accelerate launch ... tests/launched_runs.py PLAN.json``. The plan is a list of
``[out_dir, [train args]]``; each run goes through the CLI as a user's does. A failing run stops the launch."""
import json
import sys

from slca_cli.cli import app


def main(plan_file: str) -> None:
    for out, args in json.loads(open(plan_file).read()):
        code = app(["train", *map(str, args), "--out", out], standalone_mode=False)
        if code:  # typer.Exit(2) of a refused run comes back as its exit code
            sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1])
