"""What a new user hits first: `--help` and `--version` without torch, no stray warning, logs apart from results,
`budgetlora config`, evaluate's metrics kept when the run folder is read-only, input overrides and --device."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from budgetlora import cli
from budgetlora.cli import main
from budgetlora.config import RunConfig
from budgetlora.config_help import config_sections, field_sources

from .conftest import TrainedRun, tiny_config_dict, write_csv

COMMANDS = tuple(cli.COMMANDS)
HEAVY_MODULES = ("torch", "transformers", "peft", "datasets", "sklearn", "pandas")

# Runs `main` on each argv of argv[1] (JSON) in one fresh interpreter, then prints which of argv[2] it imported.
IMPORTS_SCRIPT = """
import contextlib, io, json, sys
from budgetlora.cli import main
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    assert code == 0, (argv, code)
print(json.dumps([name for name in json.loads(sys.argv[2]) if name in sys.modules]))
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`budgetlora args` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "budgetlora.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_help_version_and_config_import_no_heavy_module() -> None:
    argvs = [["--help"], ["--version"], *([command, "--help"] for command in COMMANDS), ["config"]]
    done = subprocess.run([sys.executable, "-c", IMPORTS_SCRIPT, json.dumps(argvs), json.dumps(HEAVY_MODULES)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_version_comes_from_the_installed_package(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"budgetlora {importlib.metadata.version('budgetlora')}\n"


def test_every_run_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    taking_run = []
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        lines = capsys.readouterr().out.splitlines()
        run_lines = [line for line in lines if line.strip().startswith("--run RUN")]
        if run_lines:
            taking_run.append(command)
            assert run_lines[0].strip() != "--run RUN", f"{command} --run has no help"
    assert set(taking_run) == {"evaluate", "predict", "export", "report", "serve"}


def test_results_on_stdout_logs_on_stderr_and_no_gradient_checkpointing_warning(tiny_roberta_dir: Path) -> None:
    done = run_cli("params", f"model.name={tiny_roberta_dir}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("group") and "trainable" in done.stdout and "INFO" not in done.stdout
    assert "is_gradient_checkpointing" not in done.stderr and "FutureWarning" not in done.stderr, done.stderr
    assert "loading configuration file" not in done.stderr  # transformers' info logs: only with --verbose

    verbose = run_cli("params", "--verbose", f"model.name={tiny_roberta_dir}")
    assert verbose.returncode == 0, verbose.stderr
    assert verbose.stdout == done.stdout
    assert "loading configuration file" in verbose.stderr and "budgetlora.modeling: attention" in verbose.stderr


def test_verbose_shows_an_errors_traceback_above_its_one_line(tiny_roberta_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = ["params", f"model.name={tiny_roberta_dir}", "lora.r=0"]
    assert main(args) == 2
    quiet = capsys.readouterr().err
    assert "Traceback" not in quiet and quiet.strip().endswith("got 0")
    assert main([*args[:1], "--verbose", *args[1:]]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback (most recent call last):" in lines and "ConfigError" in "\n".join(lines)
    assert lines[-1] == quiet.strip().splitlines()[-1]  # the one line, last


def test_overrides_may_follow_an_option(tiny_roberta_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`plan --top 1 lora.r=2` read lora.r=2 as an unrecognized argument (argparse ends a positional list at an
    option)."""
    assert main(["params", f"model.name={tiny_roberta_dir}", "--verbose", "lora.r=0"]) == 2
    assert capsys.readouterr().err.strip().endswith("got 0")  # lora.r=0 was read: refused by the config
    assert main(["plan", f"model.name={tiny_roberta_dir}", "--top", "1", "budget=50000"]) == 0
    assert "shapes fit 50,000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["params", f"model.name={tiny_roberta_dir}", "--verbose", "--bogus"])
    assert "unrecognized arguments: --bogus (budgetlora params --help lists its options)" in capsys.readouterr().err


def test_a_reader_that_stops_reading_is_no_error() -> None:
    """`budgetlora config | head`: "budgetlora: error: [Errno 32] Broken pipe"; now quiet, exit 141 as `yes | head`."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first line
    done = subprocess.run([sys.executable, "-m", "budgetlora.cli", "config"], stdout=write_end, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_help_states_the_defaults_of_options_that_have_them(capsys: pytest.CaptureFixture[str]) -> None:
    for command, option, default in [("plan", "--top", "10"), ("sweep", "--trials", "20"),
                                     ("sweep", "--heartbeat", "60"), ("serve", "--port", "8000"),
                                     ("serve", "--max-texts", "64"), ("predict", "--format", "csv"),
                                     ("export", "--format", "transformers")]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        options = " ".join(capsys.readouterr().out.partition("\noptions:")[2].split())  # argparse wraps lines
        described = options[options.index(f"{option} "):][:400]
        assert f"default: {default})" in described, (command, option)


def test_train_prints_its_result_alone_on_stdout(tiny_roberta_dir: Path, news_csv: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    values = tiny_config_dict(tiny_roberta_dir, tmp_path / "runs", {"train": {"max_steps": 2}})
    values["data"]["train"] = str(news_csv)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(values))
    assert main(["train", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].startswith("validation accuracy ")
    assert captured.out.splitlines()[1:] == [f"run folder: {tmp_path / 'runs' / 'tiny'}"]
    assert "'loss'" in captured.err  # Trainer's log dicts: on stderr with the other logs


# --- budgetlora config ---------------------------------------------------------------------------------------------

def leaf_keys(values: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in values.items():
        if isinstance(value, dict) and name not in ("rank_pattern", "alpha_pattern"):  # mappings that are values
            keys |= leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_config_lists_every_key_with_type_default_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    listed = {key.key: key for section in config_sections() for key in section.keys}
    assert set(listed) == leaf_keys(RunConfig().to_dict())
    max_length = listed["model.max_length"]
    assert (max_length.type, max_length.default) == ("int | Literal['auto']", "512")
    assert "99.5th percentile" in max_length.help and max_length.help.startswith("Longer texts are truncated")
    assert listed["data.text_columns"].default == "[text]"
    assert listed["model.tokenizer"].default == "null"
    assert listed["data.label_column"].help == ""  # the comment above text_columns is text_columns' alone

    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "  model.max_length: int | Literal['auto'] = 512\n      Longer texts are truncated" in out
    assert "augment.noise.word_dropout: float = 0.1" in out
    assert "augment.noise: Per-word probabilities of each kind of noise" in out  # the section's docstring


@dataclass
class Commented:
    """A dataclass whose comments test what counts as a field's help."""

    # First line of a's help,
    # and its second.
    a: int = 1  # a trailing comment is no one's help
    b: str = "x"

    # c's help, after a blank line.
    c: list[str] | None = None


def test_help_is_the_full_line_comments_right_above_a_field() -> None:
    assert field_sources(Commented) == {"a": ("int", "First line of a's help, and its second."),
                                        "b": ("str", ""), "c": ("list[str] | None", "c's help, after a blank line.")}


# --- evaluate and predict: a read-only run folder, input overrides, --device ------------------------------------------

@pytest.fixture
def run_copy(trained_tiny_run: TrainedRun, tmp_path: Path) -> Path:
    """A copy of the shared tiny run, which evaluate may write into."""
    return Path(shutil.copytree(trained_tiny_run.run_dir, tmp_path / "run"))




def test_evaluate_prints_its_metrics_before_saying_they_could_not_be_saved(
        run_copy: Path, news_rows: list[tuple[str, int]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_csv(tmp_path / "heldout.csv", ["text", "label"], [list(row) for row in news_rows[::10]])
    shutil.rmtree(run_copy / "evaluations", ignore_errors=True)
    (run_copy / "evaluations").write_text("a file where the evaluations folder should be\n")  # fails even as root
    assert main(["evaluate", "--run", str(run_copy), "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert f"{data}: accuracy " in captured.out and "on 20 rows" in captured.out
    last = captured.err.splitlines()[-1]  # after the progress bars
    assert last.startswith(f"budgetlora: warning: the metrics above were not saved in {run_copy / 'evaluations'}")


def test_evaluate_and_predict_take_input_overrides(run_copy: Path, news_rows: list[tuple[str, int]], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rows = news_rows[::10]
    plain = write_csv(tmp_path / "plain.csv", ["text", "label"], [list(row) for row in rows])
    # The same texts under other column names, with IDs of their own.
    renamed = write_csv(tmp_path / "renamed.csv", ["title", "topic", "row"],
                         [[text, label, f"r{i}"] for i, (text, label) in enumerate(rows)])
    assert main(["evaluate", "--run", str(run_copy), "--data", str(plain)]) == 0
    expected = capsys.readouterr().out.removeprefix(str(plain))
    assert main(["evaluate", "--run", str(run_copy), "--data", str(renamed), "data.text_columns=[title]",
                 "data.label_column=topic"]) == 0
    assert capsys.readouterr().out.removeprefix(str(renamed)) == expected
    assert len(list((run_copy / "evaluations").glob("renamed-*.json"))) == 1

    assert main(["predict", "--run", str(run_copy), "--input", str(plain), "--output", str(tmp_path / "a.csv")]) == 0
    assert main(["predict", "--run", str(run_copy), "--input", str(renamed), "--output", str(tmp_path / "b.csv"),
                 "data.text_columns=[title]", "data.id_column=row"]) == 0
    with (tmp_path / "a.csv").open() as a, (tmp_path / "b.csv").open() as b:
        by_number, by_id = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [row["ID"] for row in by_id] == [f"r{i}" for i in range(len(rows))]
    assert [row["Label"] for row in by_id] == [row["Label"] for row in by_number]


@pytest.mark.parametrize("override", ["lora.r=4", "data.train=other.csv", "text_columns=[title]"])
def test_overrides_that_do_not_read_the_input_are_refused(run_copy: Path, tmp_path: Path, override: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out.csv"
    assert main(["predict", "--run", str(run_copy), "--input", str(tmp_path / "any.csv"), "--output", str(output),
                 override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"override {override!r}: only the settings that read the input" in err, err
    assert not output.exists()


@pytest.mark.parametrize(("device", "message"), [("cuda:7", "--device cuda:7: "),
                                                 ("gpu", "--device gpu: expected cpu, cuda or cuda:N")])
def test_a_device_that_does_not_exist_is_one_line(run_copy: Path, tmp_path: Path, device: str, message: str,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # put back as it was, whatever select_device does
    output = tmp_path / "out.csv"
    for command in (["predict", "--input", str(tmp_path / "any.csv"), "--output", str(output)],
                    ["evaluate", "--data", str(tmp_path / "any.csv")]):
        assert main([*command, "--run", str(run_copy), "--device", device]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"budgetlora: error: {message}"), err
    assert not output.exists()


def test_device_cpu_hides_every_gpu(run_copy: Path, news_rows: list[tuple[str, int]], tmp_path: Path) -> None:
    source = write_csv(tmp_path / "texts.csv", ["text"], [[text] for text, _ in news_rows[:12]])
    done = run_cli("predict", "--run", str(run_copy), "--input", str(source), "--output", str(tmp_path / "out.csv"),
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 13
    chosen = subprocess.run([sys.executable, "-c", "from budgetlora.hardware import device, select_device; "
                             "select_device('cpu'); print(device())"], capture_output=True, text=True, timeout=120)
    assert chosen.stdout == "cpu\n", chosen.stderr


def test_every_command_the_parser_offers_has_a_function() -> None:
    """The arguments live in cli_parser.py, the commands in cli.py: one list must not outgrow the other."""
    from budgetlora.cli_parser import build_parser

    subparsers = next(action for action in build_parser()._actions if action.dest == "command")
    assert set(subparsers.choices) == set(cli.COMMANDS)
