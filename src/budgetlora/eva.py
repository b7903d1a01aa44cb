"""lora.init "eva": each adapter's A starts from the singular vectors of its layer's inputs (peft's EVA).

Explained Variance Adaptation (Paischer et al. 2024): before the first step, forward passes over a sample of training
texts; each adapted layer's A becomes the top-r right-singular vectors of the inputs it saw (an incremental SVD per
layer, stopped when its vectors settle), B stays zero, so training starts from the pretrained model as with a random
A. peft's rho=1 gives every layer exactly its r: the trainable count is the one the budget checked. The saved
adapter is plain LoRA: loading a run needs none of this.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from .config import ConfigError
from .hardware import device
from .modeling import length_sorted_batches

log = logging.getLogger(__name__)

# Training texts EVA reads: forward passes only, about 1% of the default job's epoch.
EVA_TEXTS = 1024
# Forward passes before EVA gives up on a layer whose singular vectors do not settle (peft itself would cycle over
# the batches for ever, e.g. on a head's dense layer that sees fewer texts per batch than its rank): this many, or
# four passes over the sample's batches where smaller batches make that more. Random-weight roberta-base settled in
# 20 (of 64 texts each).
MAX_FORWARD_PASSES = 100


def _token_mask(model_input: dict[str, torch.Tensor], peft_config: Any) -> torch.Tensor:
    """Which (text, position) entries are real tokens: padding tells nothing about the inputs' directions."""
    return model_input["attention_mask"].bool()


def _layer_rows(layer_input: Any, mask: torch.Tensor, layer_name: str) -> torch.Tensor:
    """The rows the SVD reads from one call of a layer: the real tokens of a batch's token states; any other input
    (a head's pooled vector per text, DeBERTa's relative-position embeddings) row by row."""
    states = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if states.dim() == 3 and states.shape[:2] == mask.shape:
        return states[mask]
    return states.reshape(-1, states.shape[-1]).contiguous()  # peft hashes it through view(-1)


def adapter_ranks(model: PeftModel) -> dict[str, int]:
    """Each adapted layer's rank, by module name."""
    return {name: module.r["default"] for name, module in model.named_modules() if hasattr(module, "lora_A")
            and "default" in getattr(module, "r", {})}


def initialize_eva(model: PeftModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], *, max_length: int,
                   batch_size: int, seed: int) -> None:
    """Set every adapter's A by EVA over up to EVA_TEXTS of `texts`: a random sample, its batches in random order
    (EVA stops a layer once its vectors settle, so the first batches must not all be the longest texts). After its
    ConfigError the model still carries peft's SVD hooks: build a new one."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    rows = np.random.default_rng(seed).permutation(len(texts))[:EVA_TEXTS]
    batches = [dict(batch) for _, batch in length_sorted_batches(tokenizer, [texts[i] for i in rows],
                                                                 max_length=max_length, batch_size=batch_size)]
    batches = [batches[i] for i in np.random.default_rng(seed).permutation(len(batches))]
    passes, limit = 0, max(MAX_FORWARD_PASSES, 4 * len(batches))

    def forward(model: PeftModel, inputs: dict[str, torch.Tensor]) -> Any:
        nonlocal passes
        passes += 1
        if passes > limit:
            raise ConfigError(f"lora.init: 'eva': some layers' singular vectors did not settle in {limit} forward "
                              f"passes over {len(rows):,} training texts (batches of {batch_size}, "
                              f"train.eval_batch_size); use 'default'")
        return model(**inputs)

    ranks = adapter_ranks(model)
    model.to(device())
    # Every process reads the same sample: gathering it across processes (under torchrun) would only repeat it.
    initialize_lora_eva_weights(model, dataloader=batches, forward_fn=forward, prepare_model_inputs_fn=_token_mask,
                                prepare_layer_inputs_fn=_layer_rows, gather_distributed_inputs=False,
                                show_progress_bar=False)
    if adapter_ranks(model) != ranks:  # rho=1 moves no rank: the count stays the budget's
        raise RuntimeError("EVA changed the adapters' ranks")
    log.info("lora.init eva: each adapted layer's A set from the singular vectors of its inputs over %d training "
             "texts (%d forward passes)", len(rows), passes)
