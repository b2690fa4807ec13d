"""Named starting points for a trial, per task: flat, dotted overrides (`lm.hidden_size`) of the config defaults.

A preset states only where it differs from the dataclass defaults in `trainables/config.py`, which hold every
default once; `TrialConfig.preset(task, name)` applies one. `DEFAULT_PRESETS` names the preset a run starts from
when none is asked for, for every entry point (the trial CLI and the study).
"""
from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "lm": {
        "awd": {},   # the dataclass defaults are the paper's PTB setup
        "medium": {"lm.embed_dim": 650, "lm.hidden_size": 650, "lm.num_layers": 2, "lm.dropout": 0.4,
                   "lm.dropout_hidden": 0.3, "lm.dropout_input": 0.4, "lm.weight_drop": 0.5, "lm.bptt": 35,
                   "lm.test_batch_size": 10, "train.epochs": 40, "train.lr": 30.0},
        "tiny": {"lm.embed_dim": 24, "lm.hidden_size": 32, "lm.num_layers": 2, "lm.dropout": 0.1,
                 "lm.dropout_hidden": 0.1, "lm.dropout_input": 0.1, "lm.dropout_embed": 0.0,
                 "lm.weight_drop": 0.1, "lm.bptt": 20, "lm.eval_batch_size": 10, "lm.test_batch_size": 10,
                 "train.epochs": 4, "train.lr": 20.0, "train.batch_size": 8, "train.nonmono": 2,
                 "data.corpus": "toy", "sweep.ranks": [0, 4, 8], "sweep.bits": [32, 4, 2]},
    },
    "nmt": {
        "default": {"train.optimizer": "adam", "train.lr": 1e-3, "train.clip": 1.0, "train.weight_decay": 0.0,
                    "train.batch_size": 64, "train.epochs": 20, "train.nt_asgd": False,
                    "data.corpus": "multi30k", "compress.step": 0.5, "compress.clip": 1.0,
                    "compress.targets": "recurrent+context", "sweep.ranks": [0, 8, 16, 32, 64]},
        "paper": {"train.optimizer": "adadelta", "train.lr": 1.0, "train.clip": 2.0, "train.weight_decay": 0.0,
                  "train.batch_size": 64, "train.epochs": 30, "train.nt_asgd": False,
                  "data.corpus": "multi30k", "compress.step": 0.5, "compress.clip": 1.0,
                  "compress.targets": "recurrent+context", "sweep.ranks": [0, 16, 32]},
        "tiny": {"nmt.embed_dim": 32, "nmt.hidden_size": 48, "nmt.encoder_layers": 1, "nmt.decoder_layers": 1,
                 "nmt.dropout": 0.0, "nmt.beam_size": 3, "train.optimizer": "adam", "train.lr": 5e-3,
                 "train.clip": 1.0, "train.weight_decay": 0.0, "train.batch_size": 32, "train.epochs": 16,
                 "train.nt_asgd": False, "data.corpus": "toy-copy", "data.bpe_vocab_size": 60,
                 "compress.step": 0.5, "compress.clip": 1.0, "compress.targets": "recurrent+context",
                 "sweep.ranks": [0, 4, 8], "sweep.bits": [32, 4, 2]},
    },
}

DEFAULT_PRESETS: dict[str, str] = {"lm": "awd", "nmt": "default"}   # AWD-LSTM on PTB; Adam on Multi30k
