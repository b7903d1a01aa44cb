"""int8 prediction on a tiny trained run: torch's (modeling.quantize_int8: the linear layers dynamically quantised) and
onnxruntime's (onnx_int8.py), asked for with --precision int8 / int8-onnx (never the default: they change some
labels), serving, and the refused combinations."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from budgetlora.cli import main
from budgetlora.config import ConfigError, RunConfig, from_dict
from budgetlora.hardware import INT8_ENGINE, resolve_predict_precision
from budgetlora.modeling import predict_logits
from budgetlora.onnx_int8 import OnnxInt8Classifier, write_int8_graph
from budgetlora.runfolder import Run, load
from budgetlora.serve import create_app
from budgetlora.train import train

from .conftest import isolated_cache, tiny_config_dict, write_csv, write_news_csv, written_labels

Rows = list[tuple[str, int]]
# int8 rounding may flip the label of a text the model is unsure of, never many: a broken quantisation (wrong scales,
# a layer left out of the copy, activations clipped) agrees with fp32 at about chance, 25%.
MIN_AGREEMENT = 0.9

pytestmark = pytest.mark.skipif(INT8_ENGINE not in torch.backends.quantized.supported_engines,
                                reason=f"this torch build has no {INT8_ENGINE} quantized engine (not an x86 CPU)")


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, news_rows: Rows) -> Path:
    """A tiny run trained with train.precision auto: prediction keeps the float precision unless int8 is asked for."""
    folder = tmp_path_factory.mktemp("int8-run")
    values = tiny_config_dict(tiny_roberta_dir, folder / "runs", {
        "name": "int8", "train": {"max_steps": 8, "learning_rate": 5e-3, "precision": "auto"}})
    values["data"]["train"] = str(write_news_csv(folder / "news.csv", news_rows))
    with isolated_cache(folder):
        return train(from_dict(RunConfig, values)).run_dir


@pytest.fixture(scope="module")
def runs(auto_run: Path) -> dict[str, Run]:
    return {"int8": load(auto_run, precision="int8"), "fp32": load(auto_run, precision="fp32")}


@pytest.fixture
def texts(news_rows: Rows) -> list[str]:
    return [text for text, _ in news_rows]


def agreement(a: np.ndarray | list[int], b: np.ndarray | list[int]) -> float:
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def test_predict_runs_int8_when_asked(auto_run: Path, runs: dict[str, Run], texts: list[str], tmp_path: Path) -> None:
    int8, fp32 = runs["int8"], runs["fp32"]
    assert (int8.precision, fp32.precision) == ("int8", "fp32")
    assert load(auto_run).precision != "int8"  # auto: the float precision the run was validated in
    assert any(isinstance(module, DynamicInt8Linear) for module in int8.predictor.modules())
    assert not any(isinstance(module, DynamicInt8Linear) for module in int8.model.modules())
    source = write_csv(tmp_path / "texts.csv", ["text"], [(text,) for text in texts])
    output = tmp_path / "predicted.csv"
    assert main(["predict", "--run", str(auto_run), "--input", str(source), "--output", str(output),
                 "--precision", "int8"]) == 0
    labels = written_labels(output)
    int8_logits, fp32_logits = int8.predict(texts), fp32.predict(texts)
    assert labels == int8_logits.argmax(-1).tolist()
    assert np.abs(int8_logits - fp32_logits).max() > 1e-4  # int8 really ran: its rounding shows in the logits
    assert agreement(labels, fp32_logits.argmax(-1)) >= MIN_AGREEMENT
    # The int8 copy shares the float model's embeddings and norms but leaves its weights as they were.
    untouched = predict_logits(int8.model, int8.tokenizer, texts, max_length=64, batch_size=32, precision="fp32")
    np.testing.assert_allclose(untouched, fp32_logits, atol=1e-5, rtol=0)


def test_precision_option_of_predict(auto_run: Path, runs: dict[str, Run], texts: list[str], tmp_path: Path,
                                     trained_tiny_run) -> None:  # noqa: ANN001
    source = write_csv(tmp_path / "texts.csv", ["text"], [(text,) for text in texts])
    output = tmp_path / "predicted.csv"
    assert main(["predict", "--run", str(auto_run), "--input", str(source), "--output", str(output),
                 "--precision", "fp32"]) == 0
    assert written_labels(output) == runs["fp32"].predict(texts).argmax(-1).tolist()
    # A run trained in fp32 predicts in fp32 unless asked for int8.
    fp32_run = trained_tiny_run.run_dir
    assert main(["predict", "--run", str(fp32_run), "--input", str(source), "--output", str(output),
                 "--precision", "int8"]) == 0
    expected = load(fp32_run, precision="int8").predict(texts).argmax(-1)
    assert written_labels(output) == expected.tolist()
    assert agreement(expected, load(fp32_run).predict(texts).argmax(-1)) >= MIN_AGREEMENT


def test_serve_int8(auto_run: Path, runs: dict[str, Run], texts: list[str]) -> None:
    with TestClient(create_app(auto_run, precision="int8")) as client:
        assert client.get("/health").json()["precision"] == "int8"
        answer = client.post("/predict", json={"texts": texts[:48]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["labels"] == runs["int8"].predict(texts[:48]).argmax(-1).tolist()
    with TestClient(create_app(auto_run)) as client:
        assert client.get("/health").json()["precision"] in ("bf16", "fp32")


def test_int8_onnx_runs_the_quantised_graph_in_onnxruntime(auto_run: Path, runs: dict[str, Run], texts: list[str],
                                                           tmp_path: Path) -> None:
    # Activations are quantised a batch at a time, so a label can depend on the batch: every path below predicts the
    # same batches (the texts as the reader gives them, stripped; serve's 48 texts against the same 48).
    texts = [text.strip() for text in texts]
    source = write_csv(tmp_path / "texts.csv", ["text"], [(text,) for text in texts])
    output = tmp_path / "predicted.csv"
    assert main(["predict", "--run", str(auto_run), "--input", str(source), "--output", str(output),
                 "--precision", "int8-onnx"]) == 0
    with TestClient(create_app(auto_run, precision="int8-onnx")) as client:
        assert client.get("/health").json()["precision"] == "int8-onnx"
        served = client.post("/predict", json={"texts": texts[:48]}).json()["labels"]
    onnx_run = load(auto_run, precision="int8-onnx")
    logits, fp32_logits = onnx_run.predict(texts), runs["fp32"].predict(texts)
    assert written_labels(output) == logits.argmax(-1).tolist()
    assert served == onnx_run.predict(texts[:48]).argmax(-1).tolist()
    assert np.abs(logits - fp32_logits).max() > 1e-4  # int8 really ran: its rounding shows in the logits
    assert agreement(logits.argmax(-1), fp32_logits.argmax(-1)) >= MIN_AGREEMENT


def test_int8_onnx_on_bert_quantises_every_linear_layer_and_feeds_token_types(tiny_bert_dir: Path, texts: list[str],
                                                                              tmp_path: Path) -> None:
    """BERT's graph takes token_type_ids, which prediction's batches do not carry: zeros, as the model assumes. And
    the graph holds every weight in int8: one MatMulInteger per linear layer (attention's products stay float)."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    graph = write_int8_graph(model, tokenizer, tmp_path, max_length=64)
    operators = [node.op_type for node in onnx.load(graph).graph.node]
    assert operators.count("MatMulInteger") == sum(isinstance(module, nn.Linear) for module in model.modules())
    logits = predict_logits(OnnxInt8Classifier(graph, model.config, tokenizer), tokenizer, texts, max_length=64,
                            precision="int8-onnx")
    fp32 = predict_logits(model, tokenizer, texts, max_length=64, precision="fp32")
    assert np.corrcoef(logits.ravel(), fp32.ravel())[0, 1] > 0.95


def test_int8_onnx_without_onnxruntime_names_the_extra(auto_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # an import of it fails, as where it is not installed
    with pytest.raises(ConfigError, match=r"--precision int8-onnx needs onnxruntime: pip install 'budgetlora\[onnx\]'"):
        load(auto_run, precision="int8-onnx")


@pytest.mark.parametrize("precision", ["int8", "int8-onnx"])
def test_int8_on_a_gpu_is_refused(precision: str) -> None:
    with pytest.raises(ConfigError, match=rf"--precision {precision}: int8 prediction runs on the CPU only"):
        resolve_predict_precision(precision, torch.device("cuda"))
    assert not resolve_predict_precision("auto", torch.device("cpu")).startswith("int8")  # only when asked for


def test_an_unknown_precision_is_refused_naming_the_option(auto_run: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--run", str(auto_run), "--port", "0", "--precision", "int4"]) == 2
    assert "--precision 'int4': expected one of auto, fp32, bf16, fp16, int8, int8-onnx" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--precision 'fp8'"):
        load(auto_run, precision="fp8")
