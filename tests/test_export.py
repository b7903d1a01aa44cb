"""Export: every head of tiny trained runs, as a transformers folder and as ONNX, served without peft or budgetlora.

The matrix: heads {standard, lora_dense, mean, first_token} x formats {transformers, onnx}, on tiny roberta and bert
models; each run is trained once (2 steps) and exported in both formats. One fresh interpreter, where neither peft
nor budgetlora can be imported, serves every export (`pipeline` for transformers folders, onnxruntime for ONNX); its
labels must be `predict_run`'s.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from budgetlora.config import ConfigError, RunConfig, dump_config, from_dict
from budgetlora.export import REMOTE_CODE_FILE, ExportTargetExistsError, export_run
from budgetlora.infer import predict_run
from budgetlora.modeling import load_tokenizer, predict_logits
from budgetlora.runfolder import RunFolderError, load, read_config
from budgetlora.train import train

from .conftest import LABELS, isolated_cache, tiny_config_dict, write_news_csv, written_labels

Rows = list[tuple[str, int]]
MAX_LENGTH = 64
COMPACT = ("mean", "first_token")
FORMATS = ("transformers", "onnx")
# Every head in both formats, each on one family (ONNX export takes seconds a model): both families, both poolings,
# and compact heads with (bert) and without (roberta) token_type_ids.
RUNS = ["roberta-standard", "bert-lora_dense", "bert-mean", "roberta-first_token"]
# Short runs that still move the weights: a large learning rate; LoRA biases on roberta, so merging covers them too.
UPDATES = {"roberta": {"lora": {"bias": "lora_only"}}, "bert": {}}

# Runs in a fresh isolated interpreter (-I) where `import peft` and `import budgetlora` fail before transformers is
# imported (a None entry in sys.modules makes an import, and importlib.util.find_spec, report the module missing):
# what loads here loads without either installed.
SERVE_SCRIPT = """
import json, sys
for blocked in ("peft", "budgetlora"):
    sys.modules[blocked] = None
    try:
        __import__(blocked)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{blocked} is importable")
import numpy as np
import onnxruntime
import torch
torch.set_num_threads(1)
from transformers import AutoTokenizer, pipeline
request = json.load(sys.stdin)
texts, answers, classes = request["texts"], {}, {}
for name, (folder, trust) in request["transformers"].items():
    classify = pipeline("text-classification", model=folder, trust_remote_code=trust, truncation=True, device="cpu")
    answers[name] = [{a["label"]: a["score"] for a in answer} for answer in classify(texts, top_k=None)]
    classes[name] = f"{type(classify.model).__module__}.{type(classify.model).__name__}"
for name, folder in request["onnx"].items():
    labels = json.load(open(f"{folder}/labels.json"))["label_names"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    session = onnxruntime.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
    batch = tokenizer(texts, truncation=True, padding=True, return_tensors="np")
    logits = session.run(["logits"], {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()})[0]
    answers[name] = {"labels": [labels[i] for i in logits.argmax(-1)], "logits": logits.tolist()}
loaded = sorted(name for name in ("peft", "budgetlora") if sys.modules.get(name) is not None)
print(json.dumps({"answers": answers, "classes": classes, "loaded": loaded}))
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
    for name in RUNS:
        model, head = name.split("-")
        values = tiny_config_dict(tiny_model_dirs[model], folder / "runs", {"model": {"head": head}, **UPDATES[model]})
        values.update(name=name)
        values["data"]["train"] = str(data)
        values["train"].update(max_steps=2, learning_rate=5e-3, precision="fp32")
        with isolated_cache(folder):
            trained[name] = train(from_dict(RunConfig, values)).run_dir
    return trained


@pytest.fixture(scope="module")
def exports(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Every run in every format, written under umask 022 (the modes test reads them)."""
    out = tmp_path_factory.mktemp("exports")
    umask = os.umask(0o022)
    try:
        return {(name, fmt): export_run(run_dir, out / f"{name}-{fmt}", format=fmt)
                for name, run_dir in runs.items() for fmt in FORMATS}
    finally:
        os.umask(umask)


@pytest.fixture(scope="module")
def served(exports: dict[tuple[str, str], Path], texts: list[str],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The answers of one fresh interpreter, without peft or budgetlora, serving every export."""
    request = {"texts": texts, "transformers": {}, "onnx": {}}
    for (name, fmt), folder in exports.items():
        if fmt == "onnx":
            request["onnx"][f"onnx:{name}"] = str(folder)
        else:  # trust_remote_code only where the head needs it: the stock folders must load without
            request["transformers"][name] = (str(folder), name.split("-")[1] in COMPACT)
    modules = tmp_path_factory.mktemp("hf-modules")  # the remote code's cache, not ~/.cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_MODULES_CACHE": str(modules),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-I", "-c", SERVE_SCRIPT], input=json.dumps(request), capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def predictions(runs: dict[str, Path], texts: list[str],
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[int], np.ndarray]]:
    """predict_run's labels and the run's own logits for the texts, per run."""
    folder = tmp_path_factory.mktemp("predictions")
    source = folder / "texts.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["text"], *([text] for text in texts)])
    result = {}
    for name, run_dir in runs.items():
        predict_run(run_dir, str(source), folder / f"{name}.csv")
        labels = written_labels(folder / f"{name}.csv")
        run = load(run_dir)
        logits = predict_logits(run.model, run.tokenizer, texts, max_length=MAX_LENGTH, precision="fp32")
        assert logits.argmax(-1).tolist() == labels
        result[name] = (labels, logits)
    return result


def _softmax(logits: np.ndarray) -> np.ndarray:
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    return probabilities / probabilities.sum(-1, keepdims=True)


@pytest.mark.parametrize("name", RUNS)
def test_export_matrix_matches_predict_run(name: str, served: dict, predictions: dict) -> None:
    assert served["loaded"] == []  # neither peft nor budgetlora was imported by what served the exports
    # Compact heads ran the folder's own modeling file (transformers' remote-code modules); the others stock classes.
    expected_class = ("transformers_modules." if name.split("-")[1] in COMPACT else "transformers.models.")
    assert served["classes"][name].startswith(expected_class), served["classes"][name]
    labels, logits = predictions[name]
    # transformers format: the pipeline's scores are the run's softmax, so its top label is predict_run's.
    scores = np.array([[answer[label] for label in LABELS] for answer in served["answers"][name]])
    np.testing.assert_allclose(scores, _softmax(logits), atol=1e-4, rtol=0)
    assert scores.argmax(-1).tolist() == labels
    # onnx format: onnxruntime's logits (a looser tolerance: another runtime's kernels), and the same labels.
    onnx = served["answers"][f"onnx:{name}"]
    np.testing.assert_allclose(np.array(onnx["logits"]), logits, atol=1e-3, rtol=0)
    assert onnx["labels"] == [LABELS[i] for i in labels]


def test_texts_are_truncated(runs: dict[str, Path], texts: list[str]) -> None:
    """Some texts are longer than max_length: truncation=True in the pipeline is what keeps the labels equal."""
    for name in ("roberta-standard", "bert-mean"):
        tokenizer = load_tokenizer(read_config(runs[name]).model)
        assert max(len(ids) for ids in tokenizer(texts)["input_ids"]) > MAX_LENGTH


def test_export_folders_hold_what_they_need(exports: dict[tuple[str, str], Path]) -> None:
    for (name, fmt), folder in exports.items():
        names = {path.name for path in folder.iterdir()}
        assert {"tokenizer_config.json", "README.md"} <= names
        assert "adapter_config.json" not in names and not any(name.startswith(".") for name in names)
        assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == MAX_LENGTH
        if fmt == "onnx":
            assert {"model.onnx", "labels.json"} <= names and "model.safetensors" not in names
            labels = json.loads((folder / "labels.json").read_text())
            assert labels["label_names"] == LABELS and labels["max_length"] == MAX_LENGTH
            continue
        assert "model.safetensors" in names
        config = json.loads((folder / "config.json").read_text())
        assert config["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
        assert config["label2id"] == {label: i for i, label in enumerate(LABELS)}
        compact = name.split("-")[1] in COMPACT
        # Stock folders stay stock: no remote code to trust. Compact heads name their modeling file in auto_map.
        assert (REMOTE_CODE_FILE in names) == compact and ("auto_map" in config) == compact
        if compact:
            module = REMOTE_CODE_FILE.removesuffix(".py")
            assert {key: value.split(".")[0] for key, value in config["auto_map"].items()} == {
                "AutoConfig": module, "AutoModelForSequenceClassification": module}
            assert config["pooling"] == name.split("-")[1]
    siblings = {path.name for path in next(iter(exports.values())).parent.iterdir()}
    assert siblings == {folder.name for folder in exports.values()}  # no temporary folder left behind


def test_remote_code_imports_only_torch_and_transformers(exports: dict[tuple[str, str], Path]) -> None:
    """What lets the folder run without budgetlora: the modeling file imports nothing else (no relative imports)."""
    source = exports["bert-mean", "transformers"] / REMOTE_CODE_FILE
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            imported.add(node.module.split(".")[0])
    assert imported == {"__future__", "torch", "transformers"}


def test_model_card_names_recipe_budget_and_loading(runs: dict[str, Path],
                                                    exports: dict[tuple[str, str], Path]) -> None:
    for (name, fmt), folder in exports.items():
        card = (folder / "README.md").read_text()
        head = name.split("-")[1]
        params = json.loads((runs[name] / "params.json").read_text())
        validation = json.loads((runs[name] / "metrics.json").read_text())["validation"]
        assert f"head (model.head): `{head}`" in card
        assert f"trainable parameters: {params['trainable']:,}" in card and f"budget: {params['budget']:,}" in card
        assert f"accuracy: {validation['accuracy']:.4f}" in card and f"macro-F1: {validation['macro_f1']:.4f}" in card
        assert "r: 8; alpha: 16" in card and "query, value" in card and "learning rate: 0.005" in card
        assert str(read_config(runs[name]).model.name) in card
        if fmt == "onnx":
            assert "onnxruntime.InferenceSession" in card
        else:
            assert "pipeline(\"text-classification\"" in card
            assert ("trust_remote_code=True" in card) == (head in COMPACT)


def _modes(folder: Path) -> tuple[set[int], set[int]]:
    paths = [folder, *folder.rglob("*")]
    return ({stat.S_IMODE(path.stat().st_mode) for path in paths if path.is_dir()},
            {stat.S_IMODE(path.stat().st_mode) for path in paths if path.is_file()})


def test_modes_follow_the_umask(runs: dict[str, Path], exports: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    for folder in exports.values():  # written under umask 022
        assert _modes(folder) == ({0o755}, {0o644}), folder
    umask = os.umask(0o077)  # and not a fixed 0644: a stricter umask gives stricter modes
    try:
        export_run(runs["bert-mean"], tmp_path / "private")
    finally:
        os.umask(umask)
    assert _modes(tmp_path / "private") == ({0o700}, {0o600})


def test_export_refuses_a_non_empty_target(runs: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    for fmt in FORMATS:
        with pytest.raises(ExportTargetExistsError, match=rf"{target} already exists \(a folder with files in it\)"):
            export_run(runs["roberta-standard"], target, format=fmt)
    assert [path.name for path in target.iterdir()] == ["keep.txt"]
    with pytest.raises(ExportTargetExistsError, match=r"keep.txt already exists \(a file\)"):
        export_run(runs["roberta-standard"], target / "keep.txt")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]


def test_export_fills_an_empty_existing_folder(runs: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    assert export_run(runs["roberta-first_token"], target) == target
    assert (target / "model.safetensors").is_file() and (target / REMOTE_CODE_FILE).is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty"]


def test_unknown_format_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="export format 'tflite': use one of transformers, onnx"):
        export_run(runs["bert-mean"], tmp_path / "out", format="tflite")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("head", COMPACT)
def test_unfinished_compact_head_run_writes_nothing(head: str, tmp_path: Path, tiny_roberta_dir: Path) -> None:
    """Compact heads export now; a run folder without its trained weights still exports nothing."""
    config = from_dict(RunConfig, tiny_config_dict(tiny_roberta_dir, tmp_path / "runs", {"model": {"head": head}}))
    config.run_dir.mkdir(parents=True)
    (config.run_dir / "config.yaml").write_text(dump_config(config))
    (config.run_dir / "labels.json").write_text(json.dumps({"label_names": LABELS}))
    with pytest.raises(RunFolderError, match="adapter_model.safetensors is missing"):
        export_run(config.run_dir, tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["runs"]


def test_export_of_a_missing_run_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a budgetlora run folder"):
        export_run(tmp_path / "nope", tmp_path / "out")
