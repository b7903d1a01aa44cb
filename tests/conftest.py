"""Shared fixtures: real data from ../shared where it exists, tiny random models built in code, an isolated cache.

Nothing here mocks transformers, peft or datasets: the tiny models are real architectures with random weights, saved
to a folder that budgetlora loads the way it loads any local checkpoint (`model.name: <folder>`).
"""

from __future__ import annotations

import os

# huggingface_hub reads HF_HUB_OFFLINE once, when it is imported: set it before anything imports transformers or
# datasets, so no test can reach the network. The autouse fixture below sets it again per test, through monkeypatch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite is the CPU suite (as in CI) on any machine: hide GPUs before torch starts, so that a GPU box runs the same
# numerics, and the int8 tests (CPU-only prediction) run rather than meet their own refusal on a GPU.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import contextlib  # noqa: E402
import copy  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import signal  # noqa: E402
import string  # noqa: E402
from collections.abc import Callable, Collection, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    PreTrainedTokenizerBase,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from budgetlora.config import AG_NEWS_LABELS, RunConfig, from_dict  # noqa: E402

if TYPE_CHECKING:
    from budgetlora.train import TrainResult

# Tiny models gain nothing from intra-op threads, and on a small shared CPU the thread hand-offs cost milliseconds
# per matmul (measured: 7.8 ms with 2 threads against 0.03 ms with 1 for a 1024x32 @ 32x32 product).
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the repository; BUDGETLORA_TEST_SHARED_DATA points elsewhere (e.g. a missing folder, to run
# the suite as it runs where ../shared is absent).
SHARED_DATA = Path(os.environ.get("BUDGETLORA_TEST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
ROBERTA_BASE_DIR = SHARED_DATA / "roberta-base-tokenizer"
AG_NEWS_DIR = SHARED_DATA / "ag_news"
QUICKSTART_TRAIN = REPO_ROOT / "data" / "quickstart" / "train.csv"
CONFIGS_DIR = REPO_ROOT / "configs"
LABELS = list(AG_NEWS_LABELS)
ROWS_PER_CLASS = 50


requires_shared_roberta = pytest.mark.skipif(
    not (ROBERTA_BASE_DIR / "config.json").is_file(),
    reason=f"needs roberta-base's config and tokenizer from the shared data folder ({ROBERTA_BASE_DIR} is absent)",
)
requires_shared_ag_news = pytest.mark.skipif(
    not (AG_NEWS_DIR / "test.csv").is_file(),
    reason=f"needs the original AG News CSV from the shared data folder ({AG_NEWS_DIR / 'test.csv'} is absent)",
)


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokenize cache lives in the test's tmp folder (never ~/.cache), and nothing goes to the Hub."""
    monkeypatch.setenv("BUDGETLORA_CACHE", str(tmp_path / "budgetlora-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# --- tokenizers --------------------------------------------------------------------------------------------------

def build_wordpiece_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """A real BERT WordPiece tokenizer over single characters (any ASCII text encodes), from a vocab file."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{char}" for char in chars)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True)
    assert len(tokenizer) == len(vocab)
    return tokenizer


@pytest.fixture(scope="session")
def wordpiece_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return build_wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece-tokenizer"))


@pytest.fixture(scope="session")
def roberta_tokenizer(wordpiece_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """roberta-base's real tokenizer from ../shared; the tiny WordPiece tokenizer where ../shared is absent."""
    if (ROBERTA_BASE_DIR / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(ROBERTA_BASE_DIR))
    return wordpiece_tokenizer


# --- tiny random models saved as local checkpoints ---------------------------------------------------------------

# Random-weight tiny encoders. Dropout off and a wider initialisation than the 0.02 default, so that the [CLS]
# features of a random body differ enough between texts for a few optimizer steps to lower the training loss.
TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "initializer_range": 0.2, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
}


def _label_maps() -> dict[str, Any]:
    return {"num_labels": len(LABELS), "id2label": dict(enumerate(LABELS)),
            "label2id": {name: i for i, name in enumerate(LABELS)}}


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory: pytest.TempPathFactory, roberta_tokenizer: PreTrainedTokenizerBase) -> Path:
    folder = tmp_path_factory.mktemp("tiny-roberta")
    config = RobertaConfig(
        vocab_size=len(roberta_tokenizer), max_position_embeddings=520, type_vocab_size=1,
        pad_token_id=roberta_tokenizer.pad_token_id, **TINY_SHAPE, **_label_maps(),
    )
    torch.manual_seed(0)
    RobertaForSequenceClassification(config).save_pretrained(folder)
    roberta_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, wordpiece_tokenizer: PreTrainedTokenizerBase) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=len(wordpiece_tokenizer), max_position_embeddings=512,
                        pad_token_id=wordpiece_tokenizer.pad_token_id, **TINY_SHAPE, **_label_maps())
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    wordpiece_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_roberta_dir: Path, tiny_bert_dir: Path) -> dict[str, Path]:
    return {"roberta": tiny_roberta_dir, "bert": tiny_bert_dir}


# --- real AG News rows -------------------------------------------------------------------------------------------

def _read_header_csv(path: Path) -> list[tuple[str, int]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return [(row["text"], int(row["label"])) for row in csv.DictReader(handle)]


@pytest.fixture(scope="session")
def news_rows() -> list[tuple[str, int]]:
    """200 real AG News rows (text, label 0-3), the first 50 of each class, in file order.

    From ../shared's train subset; where ../shared is absent, from the repository's vendored quickstart sample
    (real rows of the same train split).
    """
    source = AG_NEWS_DIR / "train_subset.csv"
    if not source.is_file():
        source = QUICKSTART_TRAIN
    if not source.is_file():
        pytest.skip(f"needs real AG News rows: neither {AG_NEWS_DIR / 'train_subset.csv'} nor {QUICKSTART_TRAIN}")
    taken: dict[int, int] = dict.fromkeys(range(len(LABELS)), 0)
    rows = []
    for text, label in _read_header_csv(source):
        if taken[label] < ROWS_PER_CLASS:
            taken[label] += 1
            rows.append((text, label))
    assert set(taken.values()) == {ROWS_PER_CLASS}, f"{source} lacks {ROWS_PER_CLASS} rows of some class: {taken}"
    return rows


@contextlib.contextmanager
def isolated_cache(folder: Path) -> Iterator[None]:
    """The autouse fixture isolates each test; module-scoped trainings set the cache folder (and offline) themselves."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BUDGETLORA_CACHE", str(folder / "budgetlora-cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


def ctrl_c_as_in_a_terminal() -> None:
    """`preexec_fn` for a child that the test stops with SIGINT: the signal at its default, as in a terminal.

    A shell without job control (`make test &`, some CI runners) starts its background commands with SIGINT ignored,
    and Python then installs no KeyboardInterrupt handler: the child would never see the Ctrl-C the test sends.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_csv(path: Path, header: list[str], rows: Collection[Collection[object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_news_csv(path: Path, rows: list[tuple[str, int]]) -> Path:
    return write_csv(path, ["text", "label"], rows)


def written_labels(path: Path) -> list[int]:
    """The Label column of a CSV that `predict` wrote, in its order."""
    with path.open(newline="", encoding="utf-8") as handle:
        return [int(row["Label"]) for row in csv.DictReader(handle)]


@pytest.fixture
def news_csv(tmp_path: Path, news_rows: list[tuple[str, int]]) -> Path:
    """The 200 real rows as a header CSV (`text,label`), the Hugging Face AG News layout."""
    return write_news_csv(tmp_path / "news.csv", news_rows)


# --- run configs for the tiny models -----------------------------------------------------------------------------

def deep_merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def tiny_config_dict(model_dir: Path, runs_dir: Path, updates: dict[str, Any] | None = None) -> dict[str, Any]:
    """A small, fast, fp32 run of a tiny model; `updates` are merged section by section."""
    base = {
        "name": "tiny",
        "runs_dir": str(runs_dir),
        "budget": 1_000_000,
        "model": {"name": str(model_dir), "max_length": 64},
        "data": {"train": "unused.csv", "validation_fraction": 0.2},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]},
        "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 32, "precision": "fp32", "logging_steps": 1},
    }
    return deep_merge(base, updates or {})


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., RunConfig]:
    """make_config(model_dir, {section: {key: value}}) -> RunConfig, with runs_dir under the test's tmp folder."""

    def make(model_dir: Path, updates: dict[str, Any] | None = None) -> RunConfig:
        return from_dict(RunConfig, tiny_config_dict(model_dir, tmp_path / "runs", updates))

    return make


# --- one trained tiny run, shared by the whole session --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainedRun:
    config: RunConfig
    result: TrainResult  # result.model: the in-memory model training ended with (the best checkpoint's)

    @property
    def run_dir(self) -> Path:
        return self.result.run_dir


# What `trained_tiny_run` trains: tiny_config_dict's fp32 defaults on the 200 real rows (160 train, 40 validation),
# 8 optimizer steps at a learning rate that moves the weights, and trained LoRA biases (which must travel with the
# adapter too).
TRAINED_TINY_RUN = {"name": "shared-tiny", "lora": {"bias": "lora_only"},
                    "train": {"max_steps": 8, "learning_rate": 5e-3, "seed": 42}}


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path,
                     news_rows: list[tuple[str, int]]) -> TrainedRun:
    """Some finished tiny RoBERTa run (settings: TRAINED_TINY_RUN), trained once a session with its own cache.

    Shared by every module that asks for it: read it, never write into its run folder or change the in-memory model
    (copy the folder with shutil.copytree first where a test must write there, e.g. evaluate or export into it).
    """
    from budgetlora.train import train  # imported here: conftest's import stays light for the tests that train nothing

    folder = tmp_path_factory.mktemp("trained-tiny-run")
    values = tiny_config_dict(tiny_roberta_dir, folder / "runs", TRAINED_TINY_RUN)
    values["data"]["train"] = str(write_news_csv(folder / "news.csv", news_rows))
    config = from_dict(RunConfig, values)
    with isolated_cache(folder):
        return TrainedRun(config, train(config))


def logged_train_steps(tensorboard_dir: Path, skip: Collection[Path] = ()) -> list[int]:
    """The optimizer steps whose training loss the run's TensorBoard files record, leaving out the files in `skip`.

    Every training process (a first run, each resume) writes its own events file: the files a resume adds show which
    steps that resume trained.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for path in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        if path in skip:
            continue
        events = EventAccumulator(str(path))
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            steps += [event.step for event in events.Scalars("train/loss")]
    return sorted(steps)


def assert_logits_do_not_depend_on_the_batch(model: Any, config: RunConfig, texts: list[str]) -> None:
    """A text's logits alone and in one batch with all `texts` (much padding) are the same, with a random head (a
    trained one: not the zero-initialised LoRA B, and not symmetric)."""
    from budgetlora.budget import parameter_group
    from budgetlora.modeling import load_tokenizer, predict_logits

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and parameter_group(name) == "head":
                param.normal_(0, 1)
    tokenizer = load_tokenizer(config.model)
    alone = predict_logits(model, tokenizer, texts, max_length=64, batch_size=1, precision="fp32")
    together = predict_logits(model, tokenizer, texts, max_length=64, batch_size=len(texts), precision="fp32")
    np.testing.assert_allclose(together, alone, atol=1e-4, rtol=0)
