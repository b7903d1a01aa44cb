"""The run folder (`runs/<name>/`): its layout, its lock, what training writes into it and how a run is loaded back
(its files read as untrusted through run_files).

Layout (training writes it; evaluate, predict, export, serve, report and self-training read it through here):
- config.yaml: the resolved config, label names included; labels.json: the label names, for readers without
  budgetlora (checked against config.yaml when a run is loaded); params.json; manifest.json; training_texts.json.gz,
  the sample of training texts `--label-shift uniform-ood` compares an input with (domain.training_sample; not with
  data.keep_training_texts: false). Written first.
- adapter/: LoRA weights and the trained head (adapter_model.safetensors, adapter_config.json) and SHA256SUMS, the
  SHA-256 of both; metrics.json, log_history.json, validation_logits.safetensors (validation_logits.json in runs from
  before 2026-12). Written when training ends.
- checkpoints/checkpoint-<step>/ (Trainer's), tensorboard/, evaluations/ (evaluate), report/ (report).
- .lock: held by the process training the run.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from peft import PeftModel
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedTokenizerBase

from .budget import ParamReport
from .config import RunConfig, dump_config, load_config, with_overrides
from .files import atomic_write_bytes, atomic_write_text, lock_folder, umask_mode, write_json
from .hardware import device, resolve_predict_precision
from .manifest import build_manifest, file_sha256
from .modeling import (
    ModelLoadError,
    base_weights_sha256,
    build_base_model,
    load_tokenizer,
    predict_logits,
    quantize_int8,
)
from .run_files import (
    MAX_LOGITS_BYTES,
    MAX_LOGITS_HEADER_BYTES,
    NOT_WRITTEN_BY_US,
    RunFolderError,
    check_checksums,
    check_finite_weights,
    read_gzip_text_list,
    read_json_object,
    read_logits_json,
    read_logits_safetensors,
)

CONFIG_FILE = "config.yaml"
LABELS_FILE = "labels.json"
PARAMS_FILE = "params.json"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"
LOG_HISTORY_FILE = "log_history.json"
# Binary (float32 logits, int64 labels): read back at its own size. As JSON, a file of numbers or `[]`s parses into 8-30
# times its bytes (256 MiB of `[[],[],...]`: about 6 GB); runs from before 2026-12 wrote JSON (read within 16 MiB).
VALIDATION_LOGITS_FILE = "validation_logits.safetensors"
OLD_VALIDATION_LOGITS_FILE = "validation_logits.json"
TRAINING_TEXTS_FILE = "training_texts.json.gz"
# A folder from elsewhere is untrusted: a few MB of gzip can claim gigabytes. The sample's most (domain.py's limits,
# 6 bytes a character when JSON escapes it) is well below this.
MAX_TRAINING_TEXTS_BYTES = 256 << 20
ADAPTER_DIR = "adapter"
WEIGHTS_FILE = "adapter_model.safetensors"  # in ADAPTER_DIR
CHECKSUMS_FILE = "SHA256SUMS"  # in ADAPTER_DIR
CHECKED_FILES = (WEIGHTS_FILE, "adapter_config.json")  # the weights, and the settings (r, alpha) that scale them
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
EVALUATIONS_DIR = "evaluations"
REPORT_DIR = "report"
LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


def lock(run_dir: Path) -> AbstractContextManager[None]:
    """The run's exclusive lock, held while it trains (files.lock_folder: FolderLockedError when another holds it)."""
    return lock_folder(run_dir, LOCK_FILE)


def write_header(config: RunConfig, params: ParamReport, data_rows: dict[str, int], training_texts: list[str],
                 base_sha256: str) -> None:
    """What the run is, written before training: config, label names, parameter counts, manifest (with `base_sha256`,
    modeling.base_weights_sha256 of the base model, which loading compares), and (unless data.keep_training_texts is
    false) the sample of its training texts that prediction's domain split reads."""
    from .domain import training_sample  # scikit-learn's import: only where training or the domain split needs it

    run_dir = config.run_dir
    atomic_write_text(run_dir / CONFIG_FILE, dump_config(config))
    if config.data.keep_training_texts:  # mtime=0: the same texts give the same bytes
        atomic_write_bytes(run_dir / TRAINING_TEXTS_FILE, gzip.compress(
            json.dumps(training_sample(training_texts), ensure_ascii=False).encode(), compresslevel=6, mtime=0))
    else:  # a resume that turned it off
        (run_dir / TRAINING_TEXTS_FILE).unlink(missing_ok=True)
    write_json(run_dir / MANIFEST_FILE, {**build_manifest(config, data_rows), "base_model_sha256": base_sha256})
    write_json(run_dir / LABELS_FILE, {"label_names": config.data.label_names})
    write_json(run_dir / PARAMS_FILE, {"groups": params.groups, "trainable": params.trainable,
                                       "budget": params.budget, "total": params.total_params,
                                       "targets": {k: len(v) for k, v in params.targets.matches.items()}})


def write_results(run_dir: Path, model: PeftModel, metrics: dict[str, Any], log_history: list[dict[str, Any]],
                  validation_logits: np.ndarray, validation_labels: list[int]) -> None:
    """What training ended with: the kept model, its metrics and log, and its logits on the validation rows (for
    calibration at prediction time)."""
    write_weights(run_dir, model)
    write_metrics(run_dir, metrics)
    write_json(run_dir / LOG_HISTORY_FILE, log_history)
    write_validation_logits(run_dir, validation_logits, validation_labels)


def write_validation_logits(run_dir: Path, validation_logits: np.ndarray, validation_labels: list[int]) -> None:
    """The validation rows' logits and labels (read_validation_logits), within MAX_LOGITS_BYTES."""
    logits, labels = np.asarray(validation_logits, dtype=np.float32), np.asarray(validation_labels, dtype=np.int64)
    most_rows = (MAX_LOGITS_BYTES - MAX_LOGITS_HEADER_BYTES) // (logits.shape[1] * logits.itemsize + labels.itemsize)
    if len(logits) > most_rows:  # the same rows each time: a seeded sample, in their order
        keep = np.sort(np.random.default_rng(0).choice(len(logits), most_rows, replace=False))
        logits, labels = logits[keep], labels[keep]
    atomic_write_bytes(run_dir / VALIDATION_LOGITS_FILE, safetensors.numpy.save({"logits": logits, "labels": labels}))
    (run_dir / OLD_VALIDATION_LOGITS_FILE).unlink(missing_ok=True)  # a resumed run from before


def write_weights(run_dir: Path, model: PeftModel) -> None:
    """Adapter and head weights, as safetensors (peft stores the head with the adapter via modules_to_save), and the
    SHA-256 of the files that make the model, which loading checks."""
    adapter = run_dir / ADAPTER_DIR
    model.save_pretrained(adapter, safe_serialization=True)
    # peft's blank model card: "[More Information Needed]" throughout and this machine's base model path.
    (adapter / "README.md").unlink(missing_ok=True)
    mode = umask_mode()
    for path in adapter.iterdir():  # safetensors writes 0600; every other output follows the umask
        if path.is_file():
            path.chmod(mode)
    # sha256sum's format: `sha256sum -c SHA256SUMS` in the adapter folder checks them too.
    atomic_write_text(adapter / CHECKSUMS_FILE, "".join(f"{file_sha256(adapter / name)}  {name}\n"
                                                        for name in CHECKED_FILES))


def weights_file(run_dir: Path) -> Path:
    """The run's adapter and head weights (adapter/adapter_model.safetensors)."""
    return Path(run_dir) / ADAPTER_DIR / WEIGHTS_FILE


def weights_sha256(run_dir: Path) -> str:
    """The SHA-256 of the run's adapter weights: which weights a result (an evaluation, pseudo-labels) came from."""
    return file_sha256(weights_file(run_dir))


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    write_json(run_dir / METRICS_FILE, metrics)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """metrics.json (read_json_object); a RunFolderError when training has not written it."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise RunFolderError(f"{path} is missing: the run did not finish, or the folder was copied in part")
    return read_json_object(path)


def read_validation_logits(run_dir: Path, num_labels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The logits and labels of the run's validation rows (for calibration), checked: one finite logit a class and a
    label below `num_labels` for each row. None for runs from before they were recorded."""
    run_dir = Path(run_dir)
    # lexists: a dangling link is a file that cannot be read (an error naming it), not a run that recorded none.
    if os.path.lexists(path := run_dir / VALIDATION_LOGITS_FILE):
        logits, labels = read_logits_safetensors(path)
    elif os.path.lexists(path := run_dir / OLD_VALIDATION_LOGITS_FILE):
        logits, labels = read_logits_json(path)
    else:
        return None
    if (logits is None or labels is None or logits.shape != (len(labels), num_labels) or not len(labels)
            or not np.isfinite(logits).all() or not ((labels >= 0) & (labels < num_labels)).all()):
        raise RunFolderError(f"{path} does not hold {num_labels} finite logits and a label below {num_labels} for "
                             f"each validation row; {NOT_WRITTEN_BY_US} (or delete it to predict uncalibrated)")
    return logits.astype(np.float64), labels


def read_train_priors(run_dir: Path, num_labels: int) -> np.ndarray:
    """The class shares of the run's training rows (metrics.json's train_label_counts); uniform for runs that did not
    record them."""
    counts = read_metrics(run_dir).get("train_label_counts")
    if counts is None:
        return np.full(num_labels, 1 / num_labels)
    # Counts of rows: below 2**53, so float64 holds them exactly and their sum cannot overflow.
    if not (isinstance(counts, list) and len(counts) == num_labels
            and all(type(count) is int and 0 <= count < 2**53 for count in counts) and sum(counts) > 0):
        raise RunFolderError(f"{Path(run_dir) / METRICS_FILE}: train_label_counts is not a count of training rows for "
                             f"each of the {num_labels} classes; {NOT_WRITTEN_BY_US}")
    return np.asarray(counts, dtype=np.float64) / sum(counts)


def read_training_texts(run_dir: Path) -> list[str] | None:
    """The run's sample of training texts, checked (the folder may come from elsewhere); None for runs from before
    budgetlora kept it, or trained with data.keep_training_texts false."""
    from .domain import MAX_TEXT_CHARS, MAX_TRAINING_TEXTS

    path = Path(run_dir) / TRAINING_TEXTS_FILE
    if not path.is_file():
        return None
    return read_gzip_text_list(path, MAX_TRAINING_TEXTS_BYTES, MAX_TRAINING_TEXTS, MAX_TEXT_CHARS)


def latest_checkpoint(run_dir: Path) -> str | None:
    """The newest complete checkpoint: Trainer writes trainer_state.json last, so a save cut off by a crash (kill -9)
    lacks it and is skipped in favour of the one before."""
    checkpoints = sorted((run_dir / CHECKPOINTS_DIR).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [c for c in checkpoints if (c / "trainer_state.json").is_file()]
    return str(complete[-1]) if complete else None


def read_config(run_dir: Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The run's config (with `overrides`: how to read an input), its label names checked against labels.json where
    the folder has one (training writes it for readers without budgetlora; the label names come from config.yaml)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():  # a FIFO or a device: load_config names it
        raise FileNotFoundError(f"{run_dir} is not a budgetlora run folder: {CONFIG_FILE} is missing")
    config = load_config(run_dir / CONFIG_FILE)
    labels = run_dir / LABELS_FILE
    if labels.exists():
        label_names = read_json_object(labels).get("label_names")
        if label_names != config.data.label_names:
            raise RunFolderError(f"{labels}: labels {str(label_names)[:200]} differ from the run's config "
                                 f"{config.data.label_names}")
    return with_overrides(config, list(overrides)) if overrides else config


@dataclass(frozen=True)
class Run:
    """A trained run, loaded: its config, model (adapter and head restored) and tokenizer, and its predictor."""

    path: Path
    config: RunConfig
    model: nn.Module  # float weights, LoRA merged unless loaded with merge=False: what export writes
    tokenizer: PreTrainedTokenizerBase  # its model_max_length is the run's model.max_length
    precision: str  # what predict runs in: fp32, bf16, fp16, int8 or int8-onnx (hardware.resolve_predict_precision)
    predictor: nn.Module  # what predict runs: `model`, or its int8 form (modeling.quantize_int8, onnx_int8.py)

    @property
    def label_names(self) -> list[str]:
        return self.config.data.label_names

    def predict(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Logits for `texts` with the run's own length, batch size and padding, at the precision it was loaded for."""
        return predict_logits(self.predictor, self.tokenizer, texts, max_length=self.config.model.max_length,
                              batch_size=self.config.train.eval_batch_size, precision=self.precision,
                              pad_to_max_length=self.config.model.pad_to_max_length, progress=progress)


def load(run_dir: Path, *, config: RunConfig | None = None, merge: bool = True, precision: str | None = None) -> Run:
    """Rebuild a trained run: base weights, then adapter and head from the run folder, after checking them.

    `config`: the run's config as read_config returned it (read once by callers that need it before the weights);
    None reads it here. merge=True folds the LoRA weights into the base layers: inference costs what the bare model
    costs. `precision`: what Run.predict runs in (hardware.PREDICT_PRECISIONS: int8 ones only when asked for); None: the
    run's train.precision (hardware.resolve_predict_precision). Checked before any weights are read.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir) if config is None else config
    requested = precision or config.train.precision
    precision = resolve_predict_precision(requested, device())
    _check_adapter_file(run_dir)
    try:
        base = build_base_model(config.model, config.data.label_names, seed=config.train.seed)
    except ModelLoadError as error:  # the base model the run was trained on, named in its config.yaml
        if "no such folder" not in str(error):
            raise
        raise ModelLoadError(f"{error}; this run's base model: if its folder moved, set model.name in "
                             f"{run_dir / CONFIG_FILE} to where it is now (the same model)") from None
    check_base_model(run_dir, config, base_weights_sha256(base))
    try:
        model = PeftModel.from_pretrained(base, run_dir / ADAPTER_DIR)
    except (RuntimeError, ValueError) as error:  # size or name mismatches: trained on another base model
        raise RunFolderError(f"{run_dir / ADAPTER_DIR}: does not fit model {config.model.name!r} "
                             f"({str(error).splitlines()[0]})") from None
    model = (model.merge_and_unload() if merge else model).eval()
    tokenizer = load_tokenizer(config.model)
    tokenizer.model_max_length = config.model.max_length
    log.info("prediction precision: %s (asked: %s)", precision, requested)
    return Run(run_dir, config, model, tokenizer, precision, _predictor(model, tokenizer, config, precision))


def check_base_model(run_dir: Path, config: RunConfig, base_sha256: str) -> None:
    """The base model (`base_sha256`: modeling.base_weights_sha256) must be the one the run trained on (manifest.json's
    base_model_sha256; runs saved before it was recorded are not checked): the adapter on another one predicts
    something else, and a resumed training would mix two models, with no error."""
    manifest = run_dir / MANIFEST_FILE
    saved = read_json_object(manifest) if manifest.exists() else {}
    recorded = saved.get("base_model_sha256")
    if isinstance(recorded, str) and base_sha256 != recorded:
        # The hash covers parameter names and dtypes as transformers loads them: another version may load otherwise.
        packages = saved.get("packages")
        then = packages.get("transformers") if isinstance(packages, dict) else None
        now, versions = importlib.metadata.version("transformers"), ""
        if isinstance(then, str) and then != now:
            versions = f"; it was trained with transformers {then}, this is {now}, which may load it otherwise"
        raise RunFolderError(f"model.name {config.model.name!r}: not the base model {run_dir} was trained on (its "
                             f"weights differ from the SHA-256 in {manifest.name}: another model, a changed folder or "
                             f"an update upstream{versions}); set model.name in {run_dir / CONFIG_FILE} to the model "
                             f"it was trained on")


def _predictor(model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: RunConfig, precision: str) -> nn.Module:
    """What Run.predict runs at `precision`: the model itself, or its int8 form."""
    if precision == "int8":
        return quantize_int8(model)
    if precision == "int8-onnx":
        from .onnx_int8 import int8_onnx_classifier  # onnxruntime: an extra, imported where it is asked for

        return int8_onnx_classifier(model, tokenizer, config.model.max_length)
    return model


def check_finite_logits(run_dir: Path, chunks: Iterable[np.ndarray]) -> None:
    """Non-finite logits (fp16 overflow, damaged weights) would all become class 0: refuse them, before writing.
    `chunks`: the input's logits in order, in one array or several (rows are counted over all of them)."""
    bad, first, rows = 0, None, 0
    for logits in chunks:
        flags = ~np.isfinite(logits).all(axis=-1)
        if first is None and flags.any():
            first = rows + int(flags.argmax())
        bad, rows = bad + int(flags.sum()), rows + len(logits)
    if bad:
        raise RunFolderError(f"{run_dir}: the model gave non-finite logits (NaN or inf) for {bad:,} of {rows:,} texts "
                             f"(the first: row {first}); nothing was written")


def _check_adapter_file(run_dir: Path) -> None:
    """The adapter file must hold exactly the parameters the run trained, as trained: never a silently random head."""
    weights = run_dir / ADAPTER_DIR / WEIGHTS_FILE
    if not weights.is_file():
        raise RunFolderError(f"{weights} is missing: the run did not finish, or the folder was copied in part")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            stored = sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for truncated or garbled files
        raise RunFolderError(f"{weights} is corrupt ({error})") from None
    trained = read_json_object(run_dir / PARAMS_FILE).get("trainable")
    if type(trained) is not int:
        raise RunFolderError(f"{run_dir / PARAMS_FILE} does not record the run's trainable parameter count; "
                             f"{NOT_WRITTEN_BY_US}")
    if stored != trained:
        raise RunFolderError(f"{weights} holds {stored:,} parameters but the run trained {trained:,}: the file is "
                             f"incomplete or from another run")
    if not check_checksums(run_dir / ADAPTER_DIR / CHECKSUMS_FILE, WEIGHTS_FILE):
        log.warning("%s is missing (a run saved before budgetlora recorded checksums): the adapter cannot be checked "
                    "for changes since training", run_dir / ADAPTER_DIR / CHECKSUMS_FILE)
    check_finite_weights(weights)


