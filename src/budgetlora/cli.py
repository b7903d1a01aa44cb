"""`budgetlora` command line: a thin layer over the library functions, which tests call directly."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .budget import BudgetError, count_parameters
from .config import ConfigError, load_config
from .data import DataError
from .infer import PRIOR_ADJUSTMENTS
from .modeling import ModelLoadError, RunFolderError
from .report import ReportError
from .submission import SubmissionError

# Errors that are the user's to fix: printed as one clear line, no traceback. OSError covers missing files, disk
# full and permission errors; its message names the path.
USER_ERRORS = (ConfigError, DataError, BudgetError, ModelLoadError, RunFolderError, ReportError, SubmissionError,
               OSError)


def cmd_params(args: argparse.Namespace) -> int:
    report = count_parameters(load_config(args.config, args.overrides))
    print(report.format())
    return 0 if report.within_budget else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from .planner import format_plan, plan

    config = load_config(args.config, args.overrides)
    budget = args.budget or config.budget
    print(format_plan(plan(config, budget), budget, args.top))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import SEARCH_SPACE, format_study, run_sweep, sweep_dir

    config = load_config(args.config, args.overrides)
    print(f"search space:\n{SEARCH_SPACE}\n")
    study = run_sweep(config, args.trials)
    print(format_study(study))
    if (sweep_dir(config) / "best.yaml").is_file():
        print(f"best config: {sweep_dir(config) / 'best.yaml'} (validation accuracy {study.best_value:.4f})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .modeling import CONFIG_FILE
    from .selftrain import run_training
    from .train import TrainingInterrupted

    if args.resume:
        run_dir = Path(args.resume)
        # The run folder given, wherever the command runs from: not its saved (maybe relative) runs_dir.
        overrides = [*args.overrides, f"runs_dir={run_dir.parent}", f"name={run_dir.name}"]
        config = load_config(run_dir / CONFIG_FILE, overrides)
    else:
        config = load_config(args.config, args.overrides)
    try:
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
    from .infer import evaluate_run

    metrics = evaluate_run(Path(args.run), args.data, labels=args.labels, label_shift=args.label_shift,
                           trust_pickle=args.trust_pickle)
    labelled = f" (labels: {args.labels})" if args.labels else ""
    print(f"{args.data}{labelled}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
          f"on {metrics['rows']:,} rows")
    for name, scores in metrics["per_class"].items():
        print(f"  {name:<12} precision {scores['precision']:.3f}  recall {scores['recall']:.3f}  "
              f"F1 {scores['f1-score']:.3f}")
    for column, subset in metrics["subsets"].items():
        print(f"  rows with {column}=1: accuracy {subset['accuracy']:.4f}, macro-F1 {subset['macro_f1']:.4f} "
              f"on {subset['rows']:,} rows")
    if "prior_adjustment" in metrics:
        shift = {k: v for k, v in metrics.items() if k in ("estimated_priors", "temperature", "offsets")}
        print(f"  label shift ({metrics['prior_adjustment']}): {shift}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .infer import predict_run

    to_stdout = args.output == "-"
    if to_stdout and args.format == "kaggle":
        print("budgetlora: error: --format kaggle checks the written file: give --output a file, not -",
              file=sys.stderr)
        return 2
    labels = predict_run(Path(args.run), args.input, "-" if to_stdout else Path(args.output),
                         label_shift=args.label_shift, trust_pickle=args.trust_pickle)
    print(f"wrote {len(labels):,} predictions to {'stdout' if to_stdout else args.output}",
          file=sys.stderr if to_stdout else sys.stdout)
    if args.format == "kaggle":
        from .modeling import read_labels
        from .submission import validate_submission

        print(validate_submission(Path(args.output), len(labels), len(read_labels(Path(args.run)))))
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
          batch_window_ms=args.batch_window_ms)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="budgetlora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    overrides_help = "dotted overrides such as lora.r=4 train.epochs=1"
    trust_help = "unpickle a .pkl input without restriction (it can run code); default: datasets/DataFrames only"
    shift_help = ("adjust predictions to the input's class priors: em estimates them (Saerens et al. 2002, after "
                  "calibration on the validation rows); uniform imposes equal priors, for an input balanced by "
                  "construction (it also undoes a model's bias towards some class on unfamiliar texts)")

    params = commands.add_parser("params", help="count trainable parameters per group against the budget")
    params.add_argument("--config", help="YAML config (default: built-in defaults)")
    params.add_argument("overrides", nargs="*", help=overrides_help)
    params.set_defaults(func=cmd_params)

    planner = commands.add_parser("plan", help="adapter shapes that fit the budget, best first, with exact counts")
    planner.add_argument("--config", help="YAML config: the model (default: built-in defaults)")
    planner.add_argument("--budget", type=int, help="trainable-parameter budget (default: the config's)")
    planner.add_argument("--top", type=int, default=10, help="how many candidates to list")
    planner.add_argument("overrides", nargs="*", help=overrides_help)
    planner.set_defaults(func=cmd_plan)

    sweep = commands.add_parser("sweep", help="Optuna search over adapter shape and hyperparameters, within budget")
    sweep.add_argument("--config", required=True, help="YAML config: model, data, budget, epochs")
    sweep.add_argument("--trials", type=int, default=20, help="trials to finish (refused ones count)")
    sweep.add_argument("overrides", nargs="*", help=overrides_help)
    sweep.set_defaults(func=cmd_sweep)

    train = commands.add_parser("train", help="train a LoRA adapter and head; writes a run folder")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML config")
    source.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    train.add_argument("overrides", nargs="*", help=overrides_help)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="metrics of a run on a labelled data set (or --labels)")
    evaluate.add_argument("--run", required=True)
    evaluate.add_argument("--data", required=True, help="file or Hub dataset (name or name:split)")
    evaluate.add_argument("--labels", help="labels for an unlabelled --data, joined by ID (columns ID,label; "
                          "IDs as predict numbers them); 0/1 columns also get their own metrics")
    evaluate.add_argument("--label-shift", choices=PRIOR_ADJUSTMENTS, help=shift_help)
    evaluate.add_argument("--trust-pickle", action="store_true", help=trust_help)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = commands.add_parser("predict", help="write an ID,Label CSV for unlabelled texts")
    predict.add_argument("--run", required=True)
    predict.add_argument("--input", required=True, help="file or Hub dataset (name or name:split)")
    predict.add_argument("--output", required=True, help="CSV to write (atomically; a symlink's target), or - for "
                         "stdout")
    predict.add_argument("--label-shift", choices=PRIOR_ADJUSTMENTS, help=shift_help)
    predict.add_argument("--trust-pickle", action="store_true", help=trust_help)
    predict.add_argument("--format", choices=["csv", "kaggle"], default="csv",
                         help="kaggle: also check the file (header ID,Label, IDs 0..N-1, labels in range)")
    predict.set_defaults(func=cmd_predict)

    export = commands.add_parser("export", help="merge LoRA into the model: a transformers folder or ONNX (no peft)")
    export.add_argument("--run", required=True)
    export.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")
    export.add_argument("--format", choices=["transformers", "onnx"], default="transformers",
                        help="transformers: a folder pipeline() loads (compact heads: trust_remote_code=True); "
                             "onnx: model.onnx + tokenizer for onnxruntime")
    export.set_defaults(func=cmd_export)

    report = commands.add_parser("report", help="plots and summary.md of a run, in <run>/report/")
    report.add_argument("--run", required=True)
    report.set_defaults(func=cmd_report)

    serve = commands.add_parser("serve", help="HTTP API over a run: POST /predict, GET /health, /docs")
    serve.add_argument("--run", required=True)
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-texts", type=int, default=64, help="most texts in one request")
    serve.add_argument("--max-chars", type=int, default=2000, help="longest text, in characters")
    serve.add_argument("--batch-window-ms", type=float, default=5.0,
                       help="how long the worker waits for more requests to batch with the first")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"budgetlora: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written atomically at the end, so nothing half-written is left
        print("budgetlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
