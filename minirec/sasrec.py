"""SASRec (Kang & McAuley, 2018), the classic sequential recommender an LLM recommender is read against.

A causal self-attention encoder over the item ids of a sample's history (the same processed samples, splits and
history windows as the LLM); the last position's state scores every catalogue item by a dot product with the shared
item embeddings. Trained with full-catalogue cross-entropy on the training split's (history → target) samples (the
loss RecBole's SASRec uses by default), early-stopped on validation NDCG@10, ranked like every other method here
(history masked, pessimistic ties, `rewards.target_rank`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minirec.evaluation import per_sample_metrics
from minirec.io import ConfigError, DataError
from minirec.rewards import mask_history, target_rank


@dataclass(frozen=True)
class SASRecConfig:
    """Model size and training schedule (defaults: the paper's Amazon settings, CE loss as RecBole).

    Args:
        dim: hidden size of item / position embeddings and the encoder.
        layers: self-attention blocks.
        heads: attention heads.
        dropout: dropout on embeddings, attention and feed-forward.
        lr: Adam learning rate.
        batch_size: training samples per step.
        max_epochs: epochs at most.
        patience: stop after this many validations without a better validation NDCG@10 (the best validated weights
            are kept).
        val_every: validate after every this many epochs (and after the last).
        seed: seed of initialisation, dropout and batch order.
    """

    dim: int = 64
    layers: int = 2
    heads: int = 1
    dropout: float = 0.5
    lr: float = 1e-3
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 20
    val_every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "layers", "heads", "batch_size", "max_epochs", "patience", "val_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sasrec.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ConfigError(f"sasrec.dim ({self.dim}) must be a multiple of sasrec.heads ({self.heads})")
        if not 0 <= self.dropout < 1 or self.lr <= 0:
            raise ConfigError(f"sasrec.dropout must be in [0, 1) and sasrec.lr > 0, got {self.dropout}, {self.lr}")


class SASRec(nn.Module):
    """Causal transformer over item ids. `forward(history [B, L] left-padded, 0 = padding)` -> scores `[B, N + 1]`
    (column 0, padding, is -inf)."""

    def __init__(self, num_items: int, max_len: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.items = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0)
        self.positions = nn.Embedding(max_len, cfg.dim)
        block = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, dim_feedforward=cfg.dim, dropout=cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.max_len = max_len
        nn.init.normal_(self.items.weight, std=cfg.dim ** -0.5)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        length = history.shape[1]
        pad = (history == 0).unsqueeze(-1)
        x = self.items(history) * math.sqrt(self.items.embedding_dim) + self.positions.weight[self.max_len - length:]
        x = self.dropout(x).masked_fill(pad, 0.0)  # padding positions carry nothing (the original's timeline mask)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=history.device)
        user = self.norm(self.encoder(x, mask=causal, is_causal=True)[:, -1])  # [B, D]
        scores = user @ self.items.weight.T  # [B, N + 1]
        scores[:, 0] = float("-inf")
        return scores


def history_tensor(histories: Sequence[Sequence[int]], max_len: int) -> torch.Tensor:
    """The last `max_len` items of each history, left-padded with 0: `[S, max_len]` long."""
    out = torch.zeros(len(histories), max_len, dtype=torch.long)
    for i, h in enumerate(histories):
        h = list(h)[-max_len:]
        if h:
            out[i, max_len - len(h):] = torch.tensor(h, dtype=torch.long)
    return out


@torch.no_grad()
def sasrec_ranks(model: SASRec, history: torch.Tensor, target: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """1-based ranks `[S]` of each target among the catalogue minus its history (eval mode)."""
    model.eval()
    ranks = [target_rank(mask_history(model(h), h, t), t)
             for h, t in zip(history.split(batch_size), target.split(batch_size))]
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def train_sasrec(
    num_items: int, train: tuple[torch.Tensor, torch.Tensor], valid: tuple[torch.Tensor, torch.Tensor],
    cfg: SASRecConfig = SASRecConfig(),
) -> tuple[SASRec, list[dict[str, float]]]:
    """Trains on (history `[S, L]`, target `[S]`) pairs, keeps the validated epoch with the best validation NDCG@10.

    Returns (model at the best epoch, in eval mode; per-validation log {epoch, loss (that epoch's), val_ndcg@10}).
    """
    if len(train[1]) == 0 or len(valid[1]) == 0:
        raise DataError(f"SASRec needs training and validation samples, got {len(train[1])} and {len(valid[1])}")
    torch.manual_seed(cfg.seed)
    model = SASRec(num_items, train[0].shape[1], cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, since_best, log = -1.0, None, 0, []
    for epoch in range(cfg.max_epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(train[1]), generator=order_gen).split(cfg.batch_size):
            loss = F.cross_entropy(model(train[0][idx]), train[1][idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % cfg.val_every and epoch + 1 < cfg.max_epochs:
            continue
        val = per_sample_metrics(sasrec_ranks(model, *valid), [10])[:, 0].mean().item()
        log.append({"epoch": epoch, "loss": total / len(train[1]), "val_ndcg@10": val})
        if val > best:
            best, best_state, since_best = val, copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    model.load_state_dict(best_state)
    return model.eval(), log
