"""The interface between a task (language modelling, translation) and the generic trial loop."""
from __future__ import annotations

import torch
from torch import nn

from trainables.config import TrainConfig
from trainables.g2lstm import GateStatistics
from trainables.pulse import Pulser, silent

ADADELTA_RHO, ADADELTA_EPS = 0.95, 1e-6   # Zeiler (2012), as in the Theano-era NMT recipes the paper follows


def make_optimizer(train: TrainConfig, params) -> torch.optim.Optimizer:
    """The optimiser `train.optimizer` names, with the trial's learning rate and weight decay."""
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    if train.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=train.lr, rho=ADADELTA_RHO, eps=ADADELTA_EPS,
                                    weight_decay=train.weight_decay)
    return torch.optim.SGD(params, lr=train.lr, weight_decay=train.weight_decay)


class Task:
    """One trial's data, model and optimiser. `run_trial` drives any subclass the same way.

    Subclasses set `metric` (the validation metric's name, e.g. "ppl" or "bleu"; its direction is
    `trainables.report.HIGHER_IS_BETTER`), keep their `device`, build `model` and `optimizer`, and implement
    the three abstract methods.
    """

    metric: str
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    pulse: Pulser = staticmethod(silent)   # told after every training batch (`trainables.pulse`); run_trial sets it

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data; {"train_loss": ...}. Raises FloatingPointError on NaN/inf loss."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """{"loss": ..., <metric>: ...} of `model` on "valid" or "test", in eval mode, deterministically."""
        raise NotImplementedError

    def gate_statistics(self, model: nn.Module) -> GateStatistics:
        """i/f gate histograms of every recurrent layer on a fixed set of held-out batches."""
        raise NotImplementedError

    def evaluation_model(self) -> nn.Module:
        """The weights to score after an epoch (AWD's averaged SGD scores the running average)."""
        return self.model

    def selection_loss(self, model: nn.Module, val: dict[str, float]) -> float:
        """The validation loss training decisions read (the best epoch, NT-ASGD's switch): `model` uncompressed,
        teacher-forced on the whole validation split with soft gates, no cache pointer, at a fixed batch size.

        No evaluation-only knob (`lm.cache_*`, `g2.eval_gate`, `lm.eval_batch_size`, `train.max_eval_batches`,
        `nmt.beam_size`, ...) changes it, so a model re-scored under other such knobs is the one a fresh trial with
        them would have kept. `val` is `evaluate(model, "valid")`, reused where it measured exactly this.
        """
        raise NotImplementedError

    def end_epoch(self, selection_loss: float) -> None:
        """Hook after validation (the LM's non-monotone ASGD switch)."""

    def start_finetune(self) -> None:
        """Hook when the optional fine-tune stage begins from the best weights."""

    def state_dict(self) -> dict:
        """Loop state beyond the model and optimiser state dicts."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; called before the optimiser state is loaded."""
