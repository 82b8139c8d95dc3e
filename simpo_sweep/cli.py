"""simpo-sweep command line: argument parsing, printing and exit codes; the work is in service/."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # as a shell reports Ctrl-C; the sweep is resumable


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simpo-sweep",
        description=(
            "Hyperparameter sweeps of SimPO preference optimisation on Ray, tracked in MLflow."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def spec_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("spec", help="the sweep's YAML spec")
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a spec value, e.g. --set search.num_samples=4 (repeatable)",
        )
        return command

    validate = spec_command("validate", "check a spec: every problem at once, with key and line")
    validate.add_argument("--address", help="also check resources against this Ray cluster")

    run = spec_command("run", "run a sweep here (local Ray) or on the cluster at --address")
    run.add_argument(
        "--address", help="Ray cluster address (ray://... is not supported; use HOST:6379 or auto)"
    )

    resume = commands.add_parser("resume", help="continue a sweep whose driver stopped")
    resume.add_argument(
        "sweep", help="the sweep's folder or URI (s3://...), or its id under simpo_runs/"
    )
    resume.add_argument("--address")
    for command in (run, resume):
        command.add_argument(
            "--verbose", "-v", action="store_true", help="show Ray's own output too"
        )

    submit = spec_command("submit", "submit the sweep to a Ray cluster as a Ray Job and return")
    submit.add_argument(
        "--address", required=True, help="the cluster's dashboard, http://HEAD:8265"
    )
    submit.add_argument(
        "--verbose", "-v", action="store_true", help="the job's log carries Ray's output too"
    )
    for name, help_text in (
        ("status", "a submitted sweep's job status"),
        ("logs", "a submitted sweep's driver logs"),
        ("stop", "stop a submitted sweep"),
    ):
        job = commands.add_parser(name, help=help_text)
        job.add_argument("job_id")
        job.add_argument("--address", required=True)
        if name == "logs":
            job.add_argument("--follow", "-f", action="store_true")
    listing = commands.add_parser("list", help="sweeps submitted to a cluster")
    listing.add_argument("--address", required=True)

    report = commands.add_parser("report", help="a sweep's trials ranked, with diagnosis and plots")
    report.add_argument("sweep", help="the sweep's folder, or its id under simpo_runs/")
    report.add_argument("--no-mlflow", action="store_true", help="do not log the plots to MLflow")

    export = commands.add_parser(
        "export", help="a trial's trained model as a Hugging Face folder (default: the best)"
    )
    export.add_argument("sweep", help="the sweep's folder or URI, or its id under simpo_runs/")
    export.add_argument("--trial", help="the trial id (default: rank 1 of the results)")
    export.add_argument("--out", help="the folder to write (default: ./<sweep id>-<trial id>)")
    export.add_argument(
        "--merge", action="store_true", help="a LoRA trial: merged weights instead of the adapter"
    )

    ui = commands.add_parser("ui", help="the MLflow UI on a sweep's tracking store")
    ui.add_argument("sweep", nargs="?", help="a sweep folder or spec; default: ./simpo_runs")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # MLflow draws a progress bar for every artifact it reads back: the report reads a small
    # table of each top trial's generations, and the bars would sit among the report's lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Imported here so that `--help` and `validate` answer without loading Ray or torch.
    from simpo_sweep.spec.loading import SpecError

    try:
        return _dispatch(args)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        from simpo_sweep.service.errors import user_errors

        if isinstance(error, user_errors()):
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILED
        raise


def _dispatch(args: argparse.Namespace) -> int:
    from simpo_sweep.spec.loading import load_spec

    if args.command == "validate":
        from simpo_sweep.service.commands import validate

        spec = load_spec(args.spec, args.overrides)
        print(validate(spec, address=args.address))
        return EXIT_OK
    if args.command == "run":
        from simpo_sweep.service.commands import print_outcome
        from simpo_sweep.service.sweep import run_sweep

        spec = load_spec(args.spec, args.overrides)
        text = Path(args.spec).read_text() if not args.overrides else None
        outcome = run_sweep(
            spec,
            spec_text=text,
            address=args.address,
            live=sys.stdout.isatty(),
            verbose=args.verbose,
        )
        print_outcome(spec, outcome)
        return _exit_code(outcome.status, outcome.best is not None)
    if args.command == "resume":
        from simpo_sweep.service.commands import print_outcome
        from simpo_sweep.service.storage import find_sweep_dir, load_sweep_spec
        from simpo_sweep.service.sweep import run_sweep

        sweep_dir = find_sweep_dir(args.sweep)
        spec = load_sweep_spec(sweep_dir)
        outcome = run_sweep(
            spec,
            address=args.address,
            sweep_id=sweep_dir.name,
            resume=True,
            live=sys.stdout.isatty(),
            verbose=args.verbose,
        )
        print_outcome(spec, outcome)
        return _exit_code(outcome.status, outcome.best is not None)
    if args.command in {"submit", "status", "logs", "stop", "list"}:
        from simpo_sweep.service import jobs

        return jobs.cli(args)
    if args.command == "report":
        from simpo_sweep.service.report import report

        print(report(args.sweep, log_to_mlflow=not args.no_mlflow))
        return EXIT_OK
    if args.command == "export":
        from simpo_sweep.service.export import export_trial

        exported = export_trial(args.sweep, trial_id=args.trial, out=args.out, merge=args.merge)
        kind = "LoRA adapter" if exported.adapter_only else "model"
        print(
            f"exported trial {exported.trial.trial_id}'s {kind} to {exported.folder}\n"
            f"  from {exported.checkpoint}\n"
            f"  load it: AutoModelForCausalLM.from_pretrained({str(exported.folder)!r})"
        )
        return EXIT_OK
    if args.command == "ui":
        from simpo_sweep.service.commands import ui_command

        command = ui_command(args.sweep, host=args.host, port=args.port)
        print("$ " + " ".join(command))
        os.execvp(command[0], command)
    raise AssertionError(args.command)


def _exit_code(status: str, has_usable_trial: bool) -> int:
    if status != "completed":
        return EXIT_INTERRUPTED
    # A sweep whose every trial failed or degenerated found nothing: scripts must see that.
    return EXIT_OK if has_usable_trial else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
