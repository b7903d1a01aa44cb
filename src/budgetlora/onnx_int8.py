"""int8 prediction through ONNX Runtime (`--precision int8-onnx`): the merged model exported as an fp32 ONNX graph
(export_onnx.export_graph, checked against the model as `export --format onnx` checks it), its weights quantised per
output channel to int8 by onnxruntime.quantization, run by onnxruntime's CPU provider.

Beside torch's int8 (modeling.quantize_int8) because it is the faithful one on real runs (README, "int8
prediction"). It costs an export at load (about 10 s for MiniLM on 2 CPU cores), not kept on disk: a graph file in a
run folder would be one more file from elsewhere to trust.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from .export import PROBE_TEXTS, check_onnx_graph
from .export_onnx import ONNX_FILE, export_graph, input_names
from .logs import errors_only

INT8_GRAPH = "model-int8.onnx"


def quantize_graph(source: Path, target: Path) -> None:
    """`source`'s weights quantised per output channel to int8 on 7 bits (reduce_range), written to `target`.

    7 bits: a CPU without VNNI (AVX2 only) multiplies uint8 activations by int8 weights in pairs summed in 16 bits,
    which saturate when both are near full range: with 8-bit weights the tests' tiny RoBERTa misses
    tests/test_quantize.py's agreement with the float model on such a CPU (torch's int8 keeps 8-bit weights and
    quantises the activations on 7 bits instead)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with errors_only(""):  # onnxruntime.quantization advises pre-processing, on the root logger, every time
        quantize_dynamic(source, target, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)


def write_int8_graph(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, max_length: int) -> Path:
    """`model` as a checked fp32 ONNX graph in `folder`, then its int8 copy (quantize_graph); the copy's path."""
    export_graph(model, tokenizer, folder / ONNX_FILE, max_length, PROBE_TEXTS)
    check_onnx_graph(model, tokenizer, folder, max_length)
    quantize_graph(folder / ONNX_FILE, folder / INT8_GRAPH)
    return folder / INT8_GRAPH


def int8_onnx_classifier(model: nn.Module, tokenizer: PreTrainedTokenizerBase, max_length: int) -> OnnxInt8Classifier:
    """`model` as its int8 graph (write_int8_graph) in an onnxruntime session; the graph files, in a temporary folder,
    are gone once the session holds the graph."""
    with tempfile.TemporaryDirectory(prefix="budgetlora-int8-onnx-") as folder:
        return OnnxInt8Classifier(write_int8_graph(model, tokenizer, Path(folder), max_length), model.config,
                                  tokenizer)


class OnnxInt8Classifier(nn.Module):
    """A classifier's int8 ONNX graph in an onnxruntime session, called as the model is (input tensors in, an output
    with .logits out), so modeling.predict_logits batches it as it batches the model. The session runs on as many
    threads as torch."""

    def __init__(self, graph: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        import onnxruntime

        super().__init__()
        self.config = config
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only: not its notes on the graph's unused initializers
        self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.inputs = input_names(tokenizer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> SequenceClassifierOutput:
        # Batches carry no token_type_ids (modeling.length_sorted_batches); a graph of a model that has them (BERT)
        # takes zeros, what the model itself assumes when they are not given.
        if token_type_ids is None and "token_type_ids" in self.inputs:
            token_type_ids = torch.zeros_like(input_ids)
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        logits = self.session.run(["logits"], {name: given[name].numpy() for name in self.inputs})[0]
        return SequenceClassifierOutput(logits=torch.from_numpy(logits))
