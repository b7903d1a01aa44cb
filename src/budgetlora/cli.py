"""`budgetlora` command line: a thin layer over the library functions, which tests call directly (its arguments:
cli_parser.py).

Each command imports what it needs when it runs: torch, transformers and peft take seconds to import, and `--help`,
`--version` and `budgetlora config` need none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
import traceback
import warnings
from pathlib import Path

from .cli_parser import INPUT_KEYS, build_parser
from .config import ConfigError, load_config

# Errors that are the user's to fix, printed as one clear line with no traceback. By (module, class), looked up only
# in the modules already imported when an error arrives: importing them here would import torch before `--help`, and
# an error class whose module was never imported cannot have been raised. OSError covers missing files, disk full
# and permission errors; its message names the path.
USER_ERRORS = (("config", "ConfigError"), ("readers", "DataError"), ("budget", "BudgetError"),
               ("modeling", "ModelLoadError"), ("runfolder", "RunFolderError"), ("report", "ReportError"),
               ("submission", "SubmissionError"), ("hardware", "DeviceError"))


def is_user_error(error: Exception) -> bool:
    """Whether `error` is the user's to fix: an OSError or one of USER_ERRORS."""
    if isinstance(error, OSError):
        return True
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(f"{__package__}.{module_name}")
        if module is not None and isinstance(error, getattr(module, class_name)):
            return True
    return False


def input_overrides(overrides: list[str]) -> list[str]:
    """`overrides` if each sets one of INPUT_KEYS, else a ConfigError naming the first that does not."""
    for override in overrides:
        if override.partition("=")[0] not in INPUT_KEYS:
            raise ConfigError(f"override {override!r}: only the settings that read the input can be overridden here "
                              f"({', '.join(key + '=...' for key in INPUT_KEYS)}); the rest is the run's own")
    return overrides


def cmd_params(args: argparse.Namespace) -> int:
    from .budget import count_parameters

    report = count_parameters(load_config(args.config, args.overrides))
    print(report.format())
    return 0 if report.within_budget else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from .planner import NoShapeFitsError, format_plan, plan

    if args.top < 1:
        raise ConfigError(f"--top: must be > 0, got {args.top}")
    # --budget as the override budget=N: 0 or less is refused as in a config file, never read as "the config's".
    budget = [] if args.budget is None else [f"budget={args.budget}"]
    config = load_config(args.config, [*args.overrides, *budget])
    try:
        candidates = plan(config, config.budget)
    except NoShapeFitsError as error:
        print(f"budgetlora: {error}", file=sys.stderr)
        return 1
    print(format_plan(candidates, config.budget, args.top))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .search_space import describe_space
    from .sweep import load_study, run_sweep, run_workers, sweep_dir
    from .sweep_results import format_study, write_results

    config = load_config(args.config, args.overrides)
    print(f"search space:\n{describe_space(config.sweep.searched)}\n")
    code = 0
    if args.workers > 1:  # the same command in N processes, one per GPU or share of the cores, on one study
        storage = ["--storage", args.storage] if args.storage else []
        grace = ["--grace", str(args.grace)] if args.grace else []
        code = run_workers(["--config", args.config, "--trials", str(args.trials), "--heartbeat", str(args.heartbeat),
                            *grace, *storage, *(["--verbose"] if args.verbose else []), *args.overrides], args.workers)
        if code:
            print(f"budgetlora: a sweep worker failed (exit status {code}); its log is above", file=sys.stderr)
            return code
        study = load_study(config, args.storage)
        write_results(study, config, sweep_dir(config))
    else:
        from .trainer import TrainingInterrupted

        try:
            with contextlib.redirect_stdout(sys.stderr):  # the trainings' log dicts (see cmd_train)
                study = run_sweep(config, args.trials, args.storage, heartbeat=args.heartbeat, grace=args.grace)
        except TrainingInterrupted as stopped:  # the trial's parameters are queued again in the study
            print(f"budgetlora: sweep stopped ({signal.Signals(stopped.signum).name}) during a trial, queued to run "
                  f"again: run the same budgetlora sweep command to continue", file=sys.stderr)
            return 128 + stopped.signum
    print(format_study(study))
    if (sweep_dir(config) / "best.yaml").is_file():
        print(f"best config: {sweep_dir(config) / 'best.yaml'} (validation accuracy {study.best_value:.4f})")
    return code


def cmd_train(args: argparse.Namespace) -> int:
    from .runfolder import CONFIG_FILE
    from .selftrain import run_training
    from .trainer import TrainingInterrupted

    if args.resume:
        run_dir = Path(args.resume)
        # The run folder given, wherever the command runs from: not its saved (maybe relative) runs_dir.
        overrides = [*args.overrides, f"runs_dir={run_dir.parent}", f"name={run_dir.name}"]
        config = load_config(run_dir / CONFIG_FILE, overrides)
    else:
        config = load_config(args.config, args.overrides)
    if args.dry_run:
        from .dry_run import dry_run

        print(dry_run(config).format())
        return 0
    try:
        # transformers' Trainer prints its log dicts (loss, evaluation metrics) on stdout: logs, not the result.
        with contextlib.redirect_stdout(sys.stderr):
            result = run_training(config, resume=bool(args.resume))
    except TrainingInterrupted as stopped:
        print(f"budgetlora: {stopped}", file=sys.stderr)
        return 128 + stopped.signum  # 130 for Ctrl-C, 143 for SIGTERM, as the shell reports them
    validation = result.metrics["validation"]
    print(f"validation accuracy {validation['accuracy']:.4f}, macro-F1 {validation['macro_f1']:.4f} "
          f"({result.params.trainable:,} trainable parameters)")
    print(f"run folder: {result.run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .infer import evaluate_run, save_evaluation
    from .metrics import subset_summary
    from .runfolder import EVALUATIONS_DIR

    run_dir = Path(args.run)
    metrics = evaluate_run(run_dir, args.data, labels=args.labels, label_shift=args.label_shift,
                           trust_pickle=args.trust_pickle, overrides=input_overrides(args.overrides), save=False,
                           precision=args.precision)
    labelled = f" (labels: {args.labels})" if args.labels else ""
    print(f"{args.data}{labelled}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
          f"on {metrics['rows']:,} rows")
    width = min(max(map(len, metrics["per_class"])), 40)  # the names' column, as wide as the longest (within reason)
    for name, scores in metrics["per_class"].items():
        print(f"  {name:<{width}} precision {scores['precision']:.3f}  recall {scores['recall']:.3f}  "
              f"F1 {scores['f1-score']:.3f}")
    for column, subset in metrics["subsets"].items():
        print(f"  {subset_summary(column, subset)}")
    if "prior_adjustment" in metrics:
        shift = {k: v for k, v in metrics.items() if k in ("estimated_priors", "temperature", "offsets")}
        print(f"  label shift ({metrics['prior_adjustment']}): {shift}")
    sys.stdout.flush()  # the metrics come before any warning about saving them
    try:
        save_evaluation(run_dir, metrics)
    except OSError as error:  # e.g. someone else's read-only run folder: the metrics above still stand
        print(f"budgetlora: warning: the metrics above were not saved in {run_dir / EVALUATIONS_DIR}: {error}",
              file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .infer import predict_run

    to_stdout = args.output == "-"
    if to_stdout and args.format == "kaggle":
        print("budgetlora: error: --format kaggle checks the written file: give --output a file, not -",
              file=sys.stderr)
        return 2
    if args.with_probs and args.format == "kaggle":
        print("budgetlora: error: --format kaggle files hold ID,Label only: drop --with-probs (or write another "
              "file with it)", file=sys.stderr)
        return 2
    rows = predict_run(Path(args.run), args.input, "-" if to_stdout else Path(args.output),
                       label_shift=args.label_shift, trust_pickle=args.trust_pickle,
                       overrides=input_overrides(args.overrides), kaggle=args.format == "kaggle",
                       with_probs=args.with_probs, precision=args.precision)
    if rows is None:  # under torchrun, a process other than the first: the first writes the file and reports
        return 0
    # With --format kaggle, the file's check (one line: rows, IDs, labels) was logged before it took its name.
    print(f"wrote {rows:,} prediction{'' if rows == 1 else 's'} to {'stdout' if to_stdout else args.output}",
          file=sys.stderr if to_stdout else sys.stdout)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    out = export_run(Path(args.run), Path(args.out), format=args.format)
    print(f"exported {args.run} to {out} ({args.format}); how to load it: {out / 'README.md'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    for path in write_report(Path(args.run)):
        print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(Path(args.run), host=args.host, port=args.port, max_texts=args.max_texts, max_chars=args.max_chars,
          batch_window_ms=args.batch_window_ms, precision=args.precision)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config_help import format_config_help

    print(format_config_help())
    return 0


COMMANDS = {"params": cmd_params, "plan": cmd_plan, "sweep": cmd_sweep, "train": cmd_train, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "export": cmd_export, "report": cmd_report, "serve": cmd_serve,
            "config": cmd_config}


def _stdout_closed() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (poll reports an error or hang-up on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))  # a socket: HUP
    except (OSError, ValueError, AttributeError):  # no poll (Windows), or stdout is no file
        return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides after an option (`train --config C --dry-run lora.r=2`): argparse ends a positional list at an option.
    if extra and hasattr(args, "overrides") and all("=" in arg and not arg.startswith("-") for arg in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)} (budgetlora {args.command} --help lists its options)")
    # Logs (and progress bars) on stderr, results on stdout: `budgetlora predict --output -` pipes a clean CSV.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # huggingface_hub prints its warnings with its own handler; through the root handler they were printed twice.
    logging.getLogger("huggingface_hub").propagate = False
    # peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model, so every command
    # that builds one printed this FutureWarning, about code that is neither budgetlora's nor the user's to change.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        if args.verbose:
            from transformers.utils import logging as transformers_logging  # its own handler, warnings only by default

            logging.getLogger(__package__).setLevel(logging.DEBUG)
            transformers_logging.set_verbosity_debug()
        if args.device is not None:
            from .hardware import select_device

            select_device(args.device)  # before the command runs: CUDA reads the choice when it starts
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe (a worker, a socket): an error like any other
        # `budgetlora config | head`: stdout's reader stopped reading, as it meant to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail too
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:  # outputs are written atomically at the end, so nothing half-written is left
        print("budgetlora: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not is_user_error(error):
            raise
        if args.verbose:  # where it came from, for a bug report; the one line stays last
            traceback.print_exception(error, file=sys.stderr)
        print(f"budgetlora: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
