"""`g2-study export` end to end: a real small study tracked by a real `mlflow server` on 127.0.0.1, its knee exported,
checked, registered, and loaded back from the server's artifact store as an MLflow model."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from study import results
from study.cli import main
from study.config import StudyConfig
from study.export import EXPORT_TAG, Selection, select_row
from study.paths import StudyPaths, read_state
from trainables import export

from conftest import mlflow_server_at, study_file

BIN = Path(sys.executable).parent
SPACE = """
[space."g2.gate_mode"]
choices = ["g2"]

[space."compress.rank"]
choices = [8]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_export")
    with mlflow_server_at(root) as uri:
        yield {"uri": uri, "artifacts": root / "artifacts"}


def g2_study(*args, cwd, timeout=600):
    return subprocess.run([str(BIN / "g2-study"), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_the_knee_of_a_real_study_exported_checked_and_logged_to_the_server(server, tmp_path):
    storage = tmp_path / "studies"
    config = study_file(tmp_path, "takeaway", num_samples=1, epochs=1, max_batches=4, max_eval_batches=2,
                        space=SPACE)
    ran = g2_study("run", config, "--storage", storage, "--tracking-uri", server["uri"], "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]

    cfg = StudyConfig.from_json(read_state(StudyPaths.named(str(storage), "takeaway")).config)
    with pytest.raises(ValueError, match=r"2 rows match; narrow it with --trial, --rank, --bits") as several:
        select_row(str(storage / "takeaway"), cfg, Selection(where="compress.rank == 8"))
    assert "svd+quant" in str(several.value)                  # the candidates are listed

    out = tmp_path / "knee"
    done = g2_study("export", "takeaway", "--knee", "--output", out, "--storage", storage, "--register",
                    "takeaway-knee", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "× model_bits/8" in done.stdout and "registered as takeaway-knee version 1" in done.stdout
    manifest = export.read_manifest(out)
    df = results.load(str(storage / "takeaway"))
    setting = ["trial_id", "compress.rank", "compress.bits", "compress.paper", "g2.eval_gate"]
    (row,) = df[(df[setting] == pd.Series({"trial_id": manifest.source.trial_id,
                                            **{k: manifest.config[k] for k in setting[1:]}})).all(axis=1)].itertuples()
    assert manifest.source.study == "takeaway" and manifest.source.training_key == row.training_key
    assert manifest.source.accounting.model_bits == row.model_bits
    assert manifest.source.metrics["val_metric"] == row.val_metric

    checked = g2_study("export", "--check", out, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "val ppl: export" in checked.stdout and "test ppl: export" in checked.stdout

    client = MlflowClient(tracking_uri=server["uri"])
    experiment = client.get_experiment_by_name("takeaway")
    (run,) = client.search_runs([experiment.experiment_id],
                                f"tags.`g2.trial_id` = '{manifest.source.trial_id}' and tags.`g2.role` = 'trial'")
    model_id = run.data.tags[EXPORT_TAG]
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run.info.run_id and logged.status == LoggedModelStatus.READY
    assert logged.artifact_location.startswith("mlflow-artifacts:")
    on_server = list(server["artifacts"].rglob("model.safetensors"))
    assert len(on_server) == 1 and model_id in str(on_server[0])
    assert on_server[0].read_bytes() == (out / export.TENSORS_FILE).read_bytes()
    (version,) = client.search_model_versions("name = 'takeaway-knee'")
    assert version.run_id == run.info.run_id and version.source == logged.artifact_location
    (link,) = json.loads(logged.tags["mlflow.modelVersions"])              # the UI's link, recorded once
    assert (link["name"], str(link["version"])) == ("takeaway-knee", version.version)

    import mlflow.pyfunc

    local = download_artifacts(artifact_uri=logged.artifact_location, dst_path=str(tmp_path / "dl"),
                               tracking_uri=server["uri"])
    pyfunc = mlflow.pyfunc.load_model(local)
    assert pyfunc.metadata.metadata["source"]["trial_id"] == manifest.source.trial_id
    assert [c.name for c in pyfunc.metadata.get_input_schema().inputs] == ["text"]
    scored = pyfunc.predict(pd.DataFrame({"text": ["the dog sees a cat", "some birds sleep"]}))
    assert list(scored.columns) == ["tokens", "nll", "ppl"] and (scored["ppl"] > 1).all()


@pytest.mark.parametrize("argv,message", [
    (["export", "quickstart"], "--output DIR is required"),
    (["export", "--knee", "--output", "x"], "name the study"),
    (["export", "quickstart", "--output", "x"], "name the row with exactly one of --trial ID, --where EXPR, --knee"),
    (["export", "quickstart", "--check", "x"], "--check DIR takes no study name"),
    (["export", "nosuchstudy", "--knee", "--output", "x"], "no study 'nosuchstudy'"),
    (["export", "quickstart", "--knee", "--bits", "0", "--output", "x"], "--bits must be an integer in [1, 16] or 32"),
])
def test_the_command_refuses_bad_input_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_check_refuses_a_directory_that_is_no_export(tmp_path, capsys):
    assert main(["export", "--check", str(tmp_path)]) == 2
    assert f"{tmp_path / 'manifest.json'}: missing" in capsys.readouterr().err
