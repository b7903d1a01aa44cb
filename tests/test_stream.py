"""Streaming prediction (stream.py): the whole-input path's output, chunk by chunk; bad rows found before the model
loads; an earlier output kept on failure; torchrun ranks that write what one process writes; memory that does not
grow with the input."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from budgetlora import runfolder
from budgetlora.cli import main
from budgetlora.config import RunConfig, from_dict
from budgetlora.data import DataError, load_table, row_ids
from budgetlora.infer import predict_run
from budgetlora.stream import CHUNK_ROWS
from budgetlora.train import train

from .conftest import LABELS, isolated_cache, tiny_config_dict, write_csv, write_news_csv

Rows = list[tuple[str, int]]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
PREVIOUS = "ID,Label\n0,3\n1,2\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, news_rows: Rows) -> Path:
    """A tiny run that predicts fast: short texts, large batches."""
    folder = tmp_path_factory.mktemp("stream-run")
    values = tiny_config_dict(tiny_bert_dir, folder / "runs", {"model": {"max_length": 32},
                                                               "train": {"max_steps": 2, "eval_batch_size": 1024}})
    values["data"]["train"] = str(write_news_csv(folder / "news.csv", news_rows))
    with isolated_cache(folder):
        return train(from_dict(RunConfig, values)).run_dir


def news_table(news_rows: Rows, rows: int) -> pd.DataFrame:
    """`rows` real texts (the 200 recycled, each copy cut differently) with unsorted, unique string IDs."""
    texts = [news_rows[i % len(news_rows)][0][: 40 + (i * 7) % 160] for i in range(rows)]
    return pd.DataFrame({"ID": [f"q{(i * 7919) % rows:05d}" for i in range(rows)], "text": texts})


def write_table(table: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        table.to_json(path, orient="records", lines=True)
    else:
        table.to_parquet(path, row_group_size=700)  # row groups that do not line up with the chunks
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_streamed_predictions_are_the_whole_input_predictions(run_dir: Path, news_rows: Rows, tmp_path: Path,
                                                              suffix: str) -> None:
    source = write_table(news_table(news_rows, 2 * CHUNK_ROWS + 300), tmp_path / f"news{suffix}")
    output = tmp_path / "predictions.csv"
    assert predict_run(run_dir, str(source), output, with_probs=True) == 2 * CHUNK_ROWS + 300
    # The whole-input path: the table read whole, every text in one call.
    run = runfolder.load(run_dir)
    table = load_table(str(source), run.config.data, labelled=False)
    probs = softmax(run.predict(table["text"][:]).astype(np.float64), axis=1)
    written = pd.read_csv(output, dtype={"ID": str})
    assert list(written.columns) == ["ID", "Label", "label_name", *(f"prob_{name}" for name in LABELS)]
    assert written["ID"].tolist() == row_ids(table)
    np.testing.assert_allclose(written[[f"prob_{name}" for name in LABELS]].to_numpy(), probs, atol=2e-6, rtol=0)
    clear = np.sort(probs, axis=1)[:, -1] - np.sort(probs, axis=1)[:, -2] > 1e-5  # not a tie within rounding
    assert clear.mean() > 0.99 and len(set(written["Label"])) > 1
    assert (written["Label"].to_numpy() == probs.argmax(1))[clear].all()
    assert written["label_name"].tolist() == [LABELS[label] for label in written["Label"]]


@pytest.mark.parametrize(("bad", "message"), [
    ("blank", "row 3001: the text is empty or only whitespace"),
    ("duplicate", "row 3001: duplicate ID {id!r} (first at row 18)"),
])
def test_a_bad_row_deep_in_the_input_fails_before_the_model_loads(run_dir: Path, news_rows: Rows, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str], bad: str,
                                                                  message: str) -> None:
    table = news_table(news_rows, 3 * CHUNK_ROWS)
    if bad == "blank":
        table.loc[3000, "text"] = "   "
    else:
        table.loc[3000, "ID"] = table.loc[17, "ID"]
    message = message.format(id=table.loc[17, "ID"])
    source = write_table(table, tmp_path / "news.jsonl")
    # A run whose weights are gone: had the model been loaded first, the error would be about them.
    broken = Path(shutil.copytree(run_dir, tmp_path / "run"))
    (broken / "adapter" / "adapter_model.safetensors").unlink()
    output = tmp_path / "predictions.csv"
    assert main(["predict", "--run", str(broken), "--input", str(source), "--output", str(output)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"budgetlora: error: {source}, {message}"
    assert not output.exists()
    with pytest.raises(DataError, match=re.escape(message)):  # as load_table says it
        load_table(str(source), runfolder.read_config(run_dir).data, labelled=False)


def test_a_failure_keeps_the_earlier_output_and_leaves_no_part_files(run_dir: Path, news_rows: Rows, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_table(news_table(news_rows, 3 * CHUNK_ROWS), tmp_path / "news.csv")
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "predictions.csv"
    output.write_text(PREVIOUS)
    real_predict, calls = runfolder.Run.predict, []

    def failing_on_the_third_chunk(self: runfolder.Run, texts: list[str], *args: object,
                                   **kwargs: object) -> np.ndarray:
        calls.append(len(texts))
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real_predict(self, texts, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runfolder.Run, "predict", failing_on_the_third_chunk)
        with pytest.raises(RuntimeError, match="out of memory"):
            predict_run(run_dir, str(source), output)
    assert calls == [CHUNK_ROWS] * 3
    # Refused as a kaggle file (its IDs are not 0..N-1) before anything is predicted.
    with pytest.raises(DataError, match=f"^{re.escape(str(source))}, row 1: ID 'q00000' \\(column 'ID', "):
        predict_run(run_dir, str(source), output, kaggle=True)
    assert output.read_text() == PREVIOUS
    assert sorted(path.name for path in folder.iterdir()) == ["predictions.csv"]


# `budgetlora predict` of each input in turn, in one fresh process, and its peak resident size after each (KiB, the
# kernel's high-water mark VmHWM; ru_maxrss would start from the size of the process it was forked from, pytest's).
PEAK_RSS_SCRIPT = """import sys
from budgetlora.cli import main
run, *sources = sys.argv[1:]
for source in sources:
    assert main(["predict", "--run", run, "--input", source, "--output", source + ".csv"]) == 0
    print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def test_peak_memory_does_not_grow_with_the_input(run_dir: Path, tmp_path: Path) -> None:
    """Before streaming, predict needed 70% more memory for these 200,000 texts than for the 20,000 (597 MiB and
    1,020 MiB, each in a process of its own)."""
    sources = []
    for rows in (20_000, 200_000):
        sources.append(tmp_path / f"texts-{rows}.jsonl")
        # Short texts: the model's time per row is small; each text its own string, as in a real corpus.
        sources[-1].write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(rows)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(run_dir), *map(str, sources)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    after_20k, after_200k = (int(line) for line in done.stdout.splitlines() if line.isdigit())
    assert after_200k <= 1.10 * after_20k, (after_20k, after_200k)
    for source, rows in zip(sources, (20_000, 200_000), strict=True):
        with Path(f"{source}.csv").open() as handle:
            assert sum(1 for _ in handle) == rows + 1


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_two_torchrun_processes_write_the_bytes_one_process_writes(run_dir: Path, news_rows: Rows,
                                                                   tmp_path: Path) -> None:
    source = write_csv(tmp_path / "news.csv", ["text"], [[text] for text, _ in news_rows * 10])  # 2,000 rows
    outputs = {1: tmp_path / "out-1" / "predictions.csv", 2: tmp_path / "out-2" / "predictions.csv"}
    assert predict_run(run_dir, str(source), outputs[1], with_probs=True) == 2000
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # --run-dir: torchrun reads --run as its own --run-path.
    done = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "budgetlora.cli", "predict",
                           "--run-dir", str(run_dir), "--input", str(source), "--output", str(outputs[2]),
                           "--with-probs"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    assert done.stdout.count("wrote 2,000 predictions") == 1  # said once, by the process that wrote the file
    assert [path.name for path in outputs[2].parent.iterdir()] == ["predictions.csv"]  # no part files left
    assert outputs[2].read_bytes() == outputs[1].read_bytes()
    with outputs[1].open() as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 2001 and [row[0] for row in rows[1:]] == [str(i) for i in range(2000)]
