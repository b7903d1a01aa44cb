"""`budgetlora`'s arguments: every command, its options and their help (cli.py runs them).

Imports nothing heavy: `--help` and `--version` answer before torch would have been imported.
"""

from __future__ import annotations

import argparse
import importlib.metadata

from .config import PRIOR_ADJUSTMENTS

# The settings `evaluate` and `predict` take as overrides: how to read their input. The rest (model, labels, adapter,
# batch size) is the run's own, from its folder.
INPUT_KEYS = ("data.text_columns", "data.label_column", "data.id_column")


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options; the command's name lands in `command` (cli.COMMANDS runs it)."""
    parser = argparse.ArgumentParser(
        prog="budgetlora", description="LoRA fine-tuning of text classifiers under a trainable-parameter budget.",
        epilog="`budgetlora config` lists every config key; `budgetlora <command> --help` the command's options.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('budgetlora')}")
    parser.set_defaults(device=None)
    commands = parser.add_subparsers(dest="command", required=True)
    # Options of every command, and of every command that loads a model.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="debug logging: transformers' debug lines, and an error's traceback above its one "
                        "line (logs go to stderr, results to stdout)")
    on_device = argparse.ArgumentParser(add_help=False, parents=[common])
    on_device.add_argument("--device", help="cpu, cuda (the first GPU) or cuda:N (that GPU only); default: the GPUs "
                           "there are (training uses them all, inference the first), else the CPU")
    overrides_help = "dotted overrides such as lora.r=4 train.epochs=1 (every key: budgetlora config)"
    input_help = f"how to read the input, overriding the run's settings: {', '.join(INPUT_KEYS)} (e.g. " \
                 "data.text_columns=[title,description])"
    run_help = "run folder, as train wrote it (runs/<name>)"
    # The values are checked where they are used (hardware.resolve_predict_precision): importing them here would
    # import torch before `--help`.
    precision_help = ("what prediction computes in: auto, bf16, fp16, fp32, int8 (the linear layers dynamically "
                      "quantised by torch; CPU only) or int8-onnx (onnxruntime with int8 weights; CPU only; the onnx "
                      "extra; an export of 10 s or more at load); default: the run's train.precision (auto: bf16 "
                      "where the hardware has it, else fp16 on a GPU, fp32 on a CPU). On two real MiniLM runs int8 "
                      "changed 1.1%% of the labels, int8-onnx 0.5-0.8%%, and int8 labels can change with the "
                      "input's order (README, 'int8 prediction')")
    trust_help = "unpickle a .pkl input without restriction (it can run code); default: datasets/DataFrames only"
    shift_help = ("adjust predictions to the input's class priors: em estimates them (Saerens et al. 2002, after "
                  "calibration on the validation rows); uniform imposes equal priors, for an input balanced by "
                  "construction (it also undoes a model's bias towards some class on unfamiliar texts); uniform-ood "
                  "imposes them only on the texts a domain classifier finds unlike the run's training texts (a sample "
                  "of them kept in the run folder), leaving the others as predicted")

    # Options of the commands that predict an input with a run (evaluate, predict).
    reads_input = argparse.ArgumentParser(add_help=False, parents=[on_device])
    reads_input.add_argument("--trust-pickle", action="store_true", help=trust_help)
    reads_input.add_argument("--precision", help=precision_help)
    reads_input.add_argument("overrides", nargs="*", help=input_help)

    params = commands.add_parser("params", parents=[common],
                                 help="count trainable parameters per group against the budget")
    params.add_argument("--config", help="YAML config (default: built-in defaults)")
    params.add_argument("overrides", nargs="*", help=overrides_help)

    planner = commands.add_parser("plan", parents=[common],
                                  help="adapter shapes that fit the budget, best first, with exact counts")
    planner.add_argument("--config", help="YAML config: the model (default: built-in defaults)")
    planner.add_argument("--budget", type=int, help="trainable-parameter budget, > 0 (default: the config's)")
    planner.add_argument("--top", type=int, default=10, help="how many candidates to list (default: %(default)s)")
    planner.add_argument("overrides", nargs="*", help=overrides_help)

    sweep = commands.add_parser("sweep", parents=[on_device],
                                help="Optuna search over adapter shape and hyperparameters, within budget")
    sweep.add_argument("--config", required=True, help="YAML config: model, data, budget, epochs, sweep.space")
    sweep.add_argument("--trials", type=int, default=20,
                       help="trials to finish in the whole study, over every worker (pruned and refused ones count; "
                       "default: %(default)s)")
    sweep.add_argument("--storage", help="the study's storage, shared by every worker: an RDB URL "
                       "(postgresql://user@host/db, needs budgetlora[sweep-postgres]) or journal:///path/file.log "
                       "(a shared file system); default: SQLite in the sweep folder")
    sweep.add_argument("--workers", type=int, default=1,
                       help="worker processes on this machine: one per visible GPU, or cores/N threads each "
                       "(default: %(default)s)")
    sweep.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS",
                       help="how often a worker signals that its trial is alive (default: %(default)s)")
    sweep.add_argument("--grace", type=int, metavar="SECONDS", help="a trial silent this long is retried by another "
                       "worker (default: twice --heartbeat)")
    sweep.add_argument("overrides", nargs="*", help=overrides_help)

    train = commands.add_parser("train", parents=[on_device], help="train a LoRA adapter and head; writes a run folder")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML config")
    source.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    train.add_argument("--dry-run", action="store_true",
                       help="check config, budget and data and time a few steps; train nothing, create no run folder")
    train.add_argument("overrides", nargs="*", help=overrides_help)

    evaluate = commands.add_parser("evaluate", parents=[reads_input],
                                   help="metrics of a run on a labelled data set (or --labels)")
    evaluate.add_argument("--run", required=True, help=run_help)
    evaluate.add_argument("--data", required=True, help="file or Hub dataset (name or name:split)")
    evaluate.add_argument("--labels", help="labels for an unlabelled --data, joined by ID (columns ID,label; "
                          "IDs as predict numbers them); 0/1 columns also get their own metrics")
    evaluate.add_argument("--label-shift", choices=PRIOR_ADJUSTMENTS, help=shift_help)

    predict = commands.add_parser("predict", parents=[reads_input], help="write an ID,Label CSV for unlabelled texts")
    # --run-dir: the same; under torchrun, which reads --run as an abbreviation of its own --run-path.
    predict.add_argument("--run", "--run-dir", required=True, help=run_help + "; --run-dir under torchrun")
    predict.add_argument("--input", required=True, help="file or Hub dataset (name or name:split); CSV, JSONL and "
                         "parquet files are streamed in chunks (memory does not grow with them), other sources are "
                         "read whole; under torchrun / accelerate launch each process predicts a share")
    predict.add_argument("--output", required=True, help="CSV to write (atomically; a symlink's target), or - for "
                         "stdout")
    predict.add_argument("--label-shift", choices=PRIOR_ADJUSTMENTS, help=shift_help + "; holds every row's "
                         "probabilities (about 150 bytes a row with 4 classes), uniform-ood every text too")
    predict.add_argument("--format", choices=["csv", "kaggle"], default="csv",
                         help="kaggle: also check the file (header ID,Label, IDs 0..N-1, labels in range; default: "
                         "%(default)s)")
    predict.add_argument("--with-probs", action="store_true",
                         help="also write each label's name and one prob_<class> column per class")

    # No --device: export merges and checks on the CPU, as the exported folder is checked against predict's logits.
    export = commands.add_parser("export", parents=[common],
                                 help="merge LoRA into the model: a transformers folder or ONNX (no peft)")
    export.add_argument("--run", required=True, help=run_help)
    export.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")
    export.add_argument("--format", choices=["transformers", "onnx"], default="transformers",
                        help="transformers: a folder pipeline() loads (compact heads: trust_remote_code=True); "
                             "onnx: model.onnx + tokenizer for onnxruntime (default: %(default)s)")

    report = commands.add_parser("report", parents=[common], help="plots and summary.md of a run, in <run>/report/")
    report.add_argument("--run", required=True, help=run_help)

    serve = commands.add_parser("serve", parents=[on_device],
                                help="HTTP API over a run: POST /predict, GET /health, /docs")
    serve.add_argument("--run", required=True, help=run_help)
    serve.add_argument("--host", default="127.0.0.1",
                       help="0.0.0.0 to listen on every interface (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    serve.add_argument("--max-texts", type=int, default=64, help="most texts in one request (default: %(default)s)")
    serve.add_argument("--max-chars", type=int, default=2000, help="longest text, in characters (default: %(default)s)")
    serve.add_argument("--batch-window-ms", type=float, default=5.0,
                       help="how long the worker waits for more requests to batch with the first "
                       "(default: %(default)s)")
    serve.add_argument("--precision", help=precision_help)

    commands.add_parser("config", parents=[common],
                        help="every config key: dotted name, type, default and what it does")
    return parser
