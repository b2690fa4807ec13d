"""The names the study writes into MLflow and Optuna, each defined once.

MLflow runs are found again by their tags (`study.tracking`), optuna-dashboard users find a trial's other records
by its user attributes (`study.search`); a trial's training key and model carry the same name in both.
"""
from __future__ import annotations

# MLflow's own tags
PARENT_ID_TAG = "mlflow.parentRunId"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
# The 3.x UI opens an experiment as GenAI (traces) or model training by this tag; ours train models.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"

# The study's tags on its runs: the parent run of a study, a child run per trial
STUDY_TAG, ROLE_TAG, TRIAL_TAG, STATUS_TAG = "g2.study", "g2.role", "g2.trial_id", "g2.status"
OPTUNA_TRIAL_TAG = "g2.optuna_trial"                  # a child run's Optuna trial number (the search asked for it)
PARENT_ROLE, TRIAL_ROLE = "parent", "trial"            # the values of ROLE_TAG
ERROR_TAG = "g2.error"                                 # a failed trial's message (in full: its error.txt)
STORAGE_TAG = "g2.storage"                             # the study directory, on the parent run
REFERENCE_TAG = "g2.hypervolume_reference"             # the fixed hypervolume reference (study.convergence)
PACKAGE_VERSION_TAG, GIT_COMMIT, GIT_DIRTY = "g2.package_version", "g2.git_commit", "g2.git_dirty"

# On a trial's MLflow run and its Optuna trial alike: the trained model it scored
TRAINING_KEY_TAG, MODEL_TAG = "g2.training_key", "g2.model"
TRAINED, REUSED = "trained", "reused"                  # the values of MODEL_TAG

# Optuna user attributes of a trial: where its other records are, or why it failed without a report
RAY_TRIAL_ATTR, MLFLOW_RUN_ATTR, ORPHAN_ATTR = "g2.ray_trial_id", "g2.mlflow_run_id", "g2.orphan"

# Optuna user attributes of the scored rows the search learns from (study.scoreboard, study.search): a row's key,
# the Ray trial that scored it, its method and evaluation gates; a suggestion the results answered, without a trial
ROW_ATTR, SOURCE_ATTR, METHOD_ATTR, GATES_ATTR = "g2.row", "g2.derived_from", "g2.method", "g2.eval_gate"
ANSWERED_ATTR = "g2.answered_from"
