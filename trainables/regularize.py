"""AWD-LSTM's regularisers (Merity et al., ICLR 2018) as functions, and the NT-ASGD switch rule.

Weight-drop lives inside G2LSTM (`weight_drop=`), where it draws one DropConnect mask per forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Variational dropout: one mask per sequence, shared over time. x: (T, B, D)."""
    if not training or p == 0.0:
        return x
    mask = x.new_empty(1, x.shape[1], x.shape[2]).bernoulli_(1 - p) / (1 - p)   # (1, B, D)
    return x * mask


def embedding_dropout(embedding: nn.Embedding, words: Tensor, p: float, training: bool) -> Tensor:
    """Drop whole word types: every occurrence of a dropped word embeds to zero in this forward.

    words: (T, B) ids -> (T, B, E).
    """
    weight = embedding.weight
    if training and p > 0.0:
        mask = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - p) / (1 - p)   # (V, 1)
        weight = weight * mask
    return F.embedding(words, weight, embedding.padding_idx)


def activation_regularization(dropped_output: Tensor, alpha: float) -> Tensor:
    """AR: α · mean(h²) on the (dropped-out) output of the last layer: keeps activations small."""
    return alpha * dropped_output.pow(2).mean()


def temporal_activation_regularization(raw_output: Tensor, beta: float) -> Tensor:
    """TAR: β · mean((h_t − h_{t−1})²) on the raw last-layer output: keeps the state slowly changing."""
    return beta * (raw_output[1:] - raw_output[:-1]).pow(2).mean()


@dataclass
class NonMonotoneTrigger:
    """NT-ASGD: switch SGD to averaged SGD once validation is worse than the best of all but the last
    `nonmono` checks (AWD-LSTM, Algorithm 1)."""

    nonmono: int = 5
    history: list[float] = field(default_factory=list)
    triggered: bool = False

    def update(self, val_loss: float) -> bool:
        """Record a validation loss; True exactly once, when the switch should happen."""
        fire = (not self.triggered and len(self.history) > self.nonmono
                and val_loss > min(self.history[:-self.nonmono]))
        self.history.append(val_loss)
        self.triggered = self.triggered or fire
        return fire

    def state_dict(self) -> dict:
        return {"nonmono": self.nonmono, "history": list(self.history), "triggered": self.triggered}

    def load_state_dict(self, state: dict) -> None:
        self.nonmono, self.history, self.triggered = state["nonmono"], list(state["history"]), state["triggered"]
