"""Tokenize once per dataset and tokenizer settings (cached on disk), without padding unless a config asks for it."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from .config import ModelConfig
from .model_sources import cache_root

log = logging.getLogger(__name__)
# Bump when the tokenized layout changes, so stale caches are not reused.
CACHE_VERSION = 1


def _fingerprint(table: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, model: ModelConfig) -> str:
    digest = hashlib.sha256()
    settings = {"version": CACHE_VERSION, "tokenizer": tokenizer.name_or_path, "vocab": len(tokenizer),
                "class": type(tokenizer).__name__, "max_length": model.max_length, "pad": model.pad_to_max_length}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps(table.to_dict(), sort_keys=True).encode())
    return digest.hexdigest()[:24]


def tokenize_table(table: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, model: ModelConfig,
                   *, cache: bool = True) -> datasets.Dataset:
    """Add `input_ids`, `attention_mask` and `length`; count rows cut to model.max_length (`truncated`)."""
    path = cache_root() / "tokenized" / _fingerprint(table, tokenizer, model)
    if cache and path.is_dir():
        return datasets.load_from_disk(str(path))

    def encode(batch: dict) -> dict:
        full_lengths = [len(ids) for ids in tokenizer(batch["text"])["input_ids"]]
        encoded = tokenizer(batch["text"], truncation=True, max_length=model.max_length,
                            padding="max_length" if model.pad_to_max_length else False)
        encoded["length"] = [sum(mask) for mask in encoded["attention_mask"]]
        encoded["truncated"] = [n > model.max_length for n in full_lengths]
        return encoded

    tokenized = table.map(encode, batched=True, batch_size=2000, desc="Tokenizing")
    if cache:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tokenized.save_to_disk(str(tmp))
        try:
            os.replace(tmp, path)  # atomic: a half-written cache is never picked up
        except OSError:  # another process (a torchrun rank) finished the same cache first: same content
            shutil.rmtree(tmp, ignore_errors=True)
        tokenized = datasets.load_from_disk(str(path))
    truncated = sum(tokenized["truncated"][:])
    if truncated:
        log.warning("%d of %d texts are longer than model.max_length=%d tokens and were truncated",
                    truncated, len(tokenized), model.max_length)
    return tokenized


def choose_max_length(tokenizer: PreTrainedTokenizerBase, texts: list[str], limit: int) -> dict[str, int]:
    """model.max_length: auto. The 99.5th percentile of the texts' token counts, rounded up to a multiple of 16 (few
    distinct shapes), at most `limit` (the model's position limit); with the percentiles it was chosen from."""
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]])
    chosen = min(limit, int(math.ceil(np.percentile(lengths, 99.5) / 16) * 16))
    return {"chosen": chosen, "limit": limit, "texts": len(texts), "p50": int(np.percentile(lengths, 50)),
            "p95": int(np.percentile(lengths, 95)), "p99": int(np.percentile(lengths, 99)), "max": int(lengths.max()),
            "truncated": int((lengths > chosen).sum())}
