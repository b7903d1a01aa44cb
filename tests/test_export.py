"""Export: tiny trained runs merged into plain transformers folders, served by `pipeline` in a process without peft."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from budgetlora.config import ConfigError, RunConfig, dump_config, from_dict
from budgetlora.export import ExportTargetExistsError, export_run
from budgetlora.infer import predict_logits, predict_run
from budgetlora.modeling import load_run_model, load_tokenizer
from budgetlora.train import train

from .conftest import LABELS, isolated_cache, tiny_config_dict, write_news_csv

Rows = list[tuple[str, int]]
MAX_LENGTH = 64
# Short runs that still move the weights: a large learning rate, LoRA and head on every kind of exportable head.
CASES = {
    "roberta-standard": ("roberta", {"model": {"head": "standard"}, "lora": {"bias": "lora_only"}}),
    "bert-lora_dense": ("bert", {"model": {"head": "lora_dense"}}),
}

# Runs in a fresh interpreter where `import peft` fails before transformers is imported (a None entry in
# sys.modules makes both `import peft` and importlib.util.find_spec("peft") report it missing).
PIPELINE_SCRIPT = """
import json, sys
sys.modules["peft"] = None
try:
    import peft  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("peft is importable")
import torch
torch.set_num_threads(1)
from transformers import pipeline
request = json.load(sys.stdin)
answers = {}
for name, folder in request["folders"].items():
    classify = pipeline("text-classification", model=folder, truncation=True, device="cpu")
    answers[name] = classify(request["texts"], top_k=None)
print(json.dumps({"answers": answers, "peft_loaded": "peft" in sys.modules and sys.modules["peft"] is not None}))
"""


@pytest.fixture(scope="module")
def texts(news_rows: Rows) -> list[str]:
    return [text for text, _ in news_rows[::10]]  # 20 real texts, 5 a class


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dirs: dict[str, Path],
         news_rows: Rows) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("export-runs")
    data = write_news_csv(folder / "news.csv", news_rows)
    trained = {}
    for name, (model, updates) in CASES.items():
        values = tiny_config_dict(tiny_model_dirs[model], folder / "runs", updates)
        values.update(name=name)
        values["data"]["train"] = str(data)
        values["train"].update(max_steps=4, learning_rate=5e-3)
        with isolated_cache(folder):
            trained[name] = train(from_dict(RunConfig, values)).run_dir
    return trained


@pytest.fixture(scope="module")
def exports(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    return {name: export_run(run_dir, out / name) for name, run_dir in runs.items()}


def test_export_folder_is_a_plain_transformers_model(exports: dict[str, Path]) -> None:
    for folder in exports.values():
        names = {path.name for path in folder.iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer_config.json", "README.md"} <= names
        assert "adapter_config.json" not in names and not any(name.startswith(".") for name in names)
        config = json.loads((folder / "config.json").read_text())
        assert config["id2label"] == {str(i): name for i, name in enumerate(LABELS)}
        assert config["label2id"] == {name: i for i, name in enumerate(LABELS)}
        assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == MAX_LENGTH
    siblings = {path.name for path in next(iter(exports.values())).parent.iterdir()}
    assert siblings == set(exports)  # no temporary folder left behind


def test_pipeline_without_peft_matches_predict_run(runs: dict[str, Path], exports: dict[str, Path],
                                                   texts: list[str], tmp_path: Path) -> None:
    request = json.dumps({"folders": {name: str(path) for name, path in exports.items()}, "texts": texts})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT], input=request, capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["peft_loaded"] is False
    source = tmp_path / "texts.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["text"], *([text] for text in texts)])
    for name, run_dir in runs.items():
        answers = result["answers"][name]
        predicted = predict_run(run_dir, str(source), tmp_path / f"{name}.csv")
        with (tmp_path / f"{name}.csv").open(newline="") as handle:
            assert [int(row["Label"]) for row in csv.DictReader(handle)] == predicted
        assert [LABELS.index(max(answer, key=lambda a: a["score"])["label"]) for answer in answers] == predicted
        # Scores too, not only the argmax: the pipeline's softmax is the run's softmax.
        model, config, _ = load_run_model(run_dir)
        tokenizer = load_tokenizer(config.model)
        logits = predict_logits(model, tokenizer, texts, max_length=MAX_LENGTH, precision="fp32")
        probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        scores = np.array([[{a["label"]: a["score"] for a in answer}[label] for label in LABELS] for answer in answers])
        np.testing.assert_allclose(scores, probabilities, atol=1e-4, rtol=0)
        # Some texts are longer than max_length: truncation=True in the pipeline is what keeps the labels equal.
        assert max(len(ids) for ids in tokenizer(texts)["input_ids"]) > MAX_LENGTH


def test_export_refuses_a_non_empty_target(runs: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ExportTargetExistsError, match=f"{target} already exists"):
        export_run(runs["roberta-standard"], target)
    assert [path.name for path in target.iterdir()] == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]


def test_export_fills_an_empty_existing_folder(runs: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    assert export_run(runs["bert-lora_dense"], target) == target
    assert (target / "model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize("head", ["mean", "first_token"])
def test_custom_heads_cannot_be_exported(head: str, tmp_path: Path, tiny_roberta_dir: Path) -> None:
    config = from_dict(RunConfig, tiny_config_dict(tiny_roberta_dir, tmp_path / "runs", {"model": {"head": head}}))
    config.run_dir.mkdir(parents=True)
    (config.run_dir / "config.yaml").write_text(dump_config(config))
    (config.run_dir / "labels.json").write_text(json.dumps({"label_names": LABELS}))
    with pytest.raises(ConfigError, match=f"model.head: '{head}' is a budgetlora module"):
        export_run(config.run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert yaml.safe_load((config.run_dir / "config.yaml").read_text())["model"]["head"] == head


def test_export_of_a_missing_run_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a budgetlora run folder"):
        export_run(tmp_path / "nope", tmp_path / "out")
