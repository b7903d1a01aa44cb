"""The model card (README.md) of an export: what was trained, how well, under what budget, and how to load it.

Everything comes from the run folder (config.yaml, params.json, metrics.json), so a folder copied away from its run
still says where it came from. A run without params.json or metrics.json (e.g. an older one) gets "not recorded".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import RunConfig
from .run_files import RunFolderError, read_json_object
from .runfolder import METRICS_FILE, PARAMS_FILE

NOT_RECORDED = "not recorded"


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object of the run folder, or {} when it is missing or unreadable: the card then says "not recorded"."""
    try:
        return read_json_object(path)
    except (OSError, RunFolderError):
        return {}


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else NOT_RECORDED


def _usage(max_length: int, fmt: str, remote_code: bool) -> str:
    if fmt == "onnx":
        return ("```python\nimport json\n\nimport numpy as np\nimport onnxruntime\n"
                "from transformers import AutoTokenizer\n\n"
                "folder = \"<this folder>\"\ntokenizer = AutoTokenizer.from_pretrained(folder)\n"
                "session = onnxruntime.InferenceSession(f\"{folder}/model.onnx\")\n"
                "labels = json.load(open(f\"{folder}/labels.json\"))[\"label_names\"]\n"
                "batch = tokenizer([\"some text\"], truncation=True, padding=True, return_tensors=\"np\")\n"
                "feed = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}\n"
                "logits = session.run([\"logits\"], feed)[0]\n"
                "print([labels[i] for i in logits.argmax(-1)])\n```\n\n"
                f"`truncation=True` cuts texts at {max_length} tokens (the tokenizer's model_max_length), as the run "
                f"was trained and evaluated.\n")
    trust = ", trust_remote_code=True" if remote_code else ""
    note = ("The compact head (pooling + one linear layer) is defined in `modeling_budgetlora.py` in this folder, "
            "which imports only torch and transformers: `trust_remote_code=True` runs that file.\n\n"
            if remote_code else "")
    return ("```python\nfrom transformers import pipeline\n\n"
            f"classify = pipeline(\"text-classification\", model=\"<this folder>\"{trust}, truncation=True)\n"
            "print(classify(\"some text\"))\n```\n\n"
            f"{note}`truncation=True` cuts texts at {max_length} tokens, as the run was trained and evaluated.\n")


def write_card(folder: Path, run_dir: Path, config: RunConfig, label_names: list[str], fmt: str,
               remote_code: bool) -> None:
    """README.md in `folder`: base model, recipe, trainable parameters and budget, metrics, loading snippet."""
    params = _read_json(run_dir / PARAMS_FILE)
    validation = _read_json(run_dir / METRICS_FILE).get("validation")
    validation = validation if isinstance(validation, dict) else {}
    trainable, budget = params.get("trainable"), params.get("budget", config.budget)
    share = (f" ({trainable / budget:.1%} of the budget)" if isinstance(trainable, int) and isinstance(budget, int)
             and budget > 0 else "")
    lora, train = config.lora, config.train
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    steps = f" (max_steps: {train.max_steps})" if train.max_steps else ""
    kind = "ONNX graph (`model.onnx`)" if fmt == "onnx" else "transformers model"
    lines = [
        f"# budgetlora export of `{run_dir.name}`", "",
        f"A text classifier: `{config.model.name}` fine-tuned with LoRA by budgetlora, the LoRA weights merged into "
        f"the base weights, saved as a {kind}. It needs neither peft nor budgetlora.", "",
        "## Recipe", "",
        f"- base model: `{config.model.name}`",
        f"- head (model.head): `{config.model.head}`",
        f"- LoRA targets: {targets}; r: {lora.r}; alpha: {lora.alpha}; dropout: {lora.dropout}; bias: {lora.bias}",
        f"- learning rate: {train.learning_rate}; epochs: {train.epochs}{steps}; batch size: {train.batch_size}",
        f"- max length: {config.model.max_length} tokens",
        f"- labels: {', '.join(label_names)}", "",
        "## Budget", "",
        f"- trainable parameters: {_number(trainable, ',')}{share}",
        f"- budget: {_number(budget, ',')}", "",
        "## Validation metrics", "",
        f"- accuracy: {_number(validation.get('accuracy'), '.4f')}",
        f"- macro-F1: {_number(validation.get('macro_f1'), '.4f')}", "",
        "## How to load it", "",
        _usage(config.model.max_length, fmt, remote_code),
    ]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")
