"""Crash-consistent writes (trainables/durable.py): the file fsynced before its rename and the directory after, a
failed write leaving the old file and no temporary one, and every file the study keeps written that way."""
import errno
import subprocess
import sys
from datetime import UTC, datetime

import optuna
import pytest
import torch

from study import results
from study.claim import CLAIM_FILE, DriverClaim
from study.config import StudyConfig
from study.paths import StudyPaths, StudyState
from study.search import StudySearch
from study.space import DefineByRun
from trainables import durable
from trainables.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from trainables.store import META_FILE, ModelStore
from trainables.toy import generate_once, toy_grammar_corpus

from conftest import REPO_ROOT

FINISHED = datetime(2026, 1, 2, tzinfo=UTC)


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- the helper

def test_a_file_is_fsynced_before_its_rename_and_its_directory_after(tmp_path, disk_log):
    durable.write_text(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "new" and leftovers(tmp_path) == []
    disk_log.assert_replaced_durably(tmp_path / "a.txt")
    fsync_file, rename, fsync_dir = disk_log.events
    assert fsync_file[0] == "fsync" and rename == ("replace", fsync_file[1], str(tmp_path / "a.txt"))
    assert fsync_dir == ("fsync", str(tmp_path))


@pytest.mark.parametrize("failure", [ValueError("not serialisable"), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["error", "disk-full"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, disk_log, failure):
    durable.write_text(tmp_path / "a.txt", "old")
    with pytest.raises(type(failure)) as caught:
        with durable.writing(tmp_path / "a.txt") as tmp:
            tmp.write_text("half of the new")
            raise failure
    assert (tmp_path / "a.txt").read_text() == "old" and leftovers(tmp_path) == []
    assert [e[2] for e in disk_log.events if e[0] == "replace"] == [str(tmp_path / "a.txt")]   # the first write only
    if isinstance(failure, OSError):   # named by the file it was writing, not the temporary one
        assert isinstance(caught.value, durable.FileNotWrittenError) and caught.value.errno == errno.ENOSPC
        assert str(caught.value) == f"could not write {tmp_path / 'a.txt'}: No space left on device"


FILE_SIZE_LIMITED = """
import resource, sys
from pathlib import Path
from trainables import durable
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    durable.write_bytes(Path(sys.argv[1]), b"x" * 5000)
except durable.FileNotWrittenError as err:
    print(err)
"""


def test_a_file_over_the_size_limit_is_not_written_and_the_old_one_stays(tmp_path):
    """RLIMIT_FSIZE as a full disk: Python ignores SIGXFSZ, so the write past the limit fails with EFBIG."""
    durable.write_bytes(tmp_path / "a.bin", b"old")
    proc = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED, str(tmp_path / "a.bin")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"could not write {tmp_path / 'a.bin'}: File too large\n"
    assert (tmp_path / "a.bin").read_bytes() == b"old" and leftovers(tmp_path) == []


def test_a_directory_is_fsynced_file_by_file_then_renamed_whole(tmp_path, disk_log):
    with durable.writing_directory(tmp_path / "out") as staging:
        (staging / "sub").mkdir()
        (staging / "a.txt").write_text("a")
        (staging / "sub" / "b.txt").write_text("b")
    assert (tmp_path / "out" / "sub" / "b.txt").read_text() == "b" and leftovers(tmp_path) == []
    disk_log.assert_directory_replaced_durably(tmp_path / "out")

    with pytest.raises(durable.FileNotWrittenError, match=f"^could not write {tmp_path / 'out'}: "):
        with durable.writing_directory(tmp_path / "out") as staging:   # onto a full directory: refused
            (staging / "c.txt").write_text("c")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "sub"] and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- the study's files

def test_results_curves_and_gates_are_written_durably(tmp_path, disk_log):
    row = {"study": "s", "trial_id": "t1", "status": "error", "error": "boom", "finished_at": FINISHED}
    curve = {"study": "s", "trial_id": "t1", "epoch": 1, "train_loss": 1.0}
    gate = {"study": "s", "trial_id": "t1", "g2.gate_mode": "g2", "epoch": 1, "layer": 0, "gate": "i", "bin": 0,
            "fraction": 1.0}
    results.write_trial(tmp_path, "t1", [row])
    results.write_curves(tmp_path, "t1", [curve])
    results.write_gates(tmp_path, "t1", [gate])
    for sub in ("results", "curves", "gates"):
        disk_log.assert_replaced_durably(tmp_path / sub / "t1.parquet")
        assert leftovers(tmp_path / sub) == []
    assert results.load(tmp_path)["error"].tolist() == ["boom"] and len(results.load_gates(tmp_path)) == 1


def test_the_study_state_and_the_driver_claim_are_written_durably(tmp_path, disk_log):
    paths = StudyPaths(tmp_path / "s")
    with DriverClaim(paths.root, "s", printer=lambda line: None):
        disk_log.assert_replaced_durably(paths.root / CLAIM_FILE)
        StudyState({"study.name": "s"}).write(paths.state)
        disk_log.assert_replaced_durably(paths.state)
    assert StudyState.read(paths.state).config == {"study.name": "s"}


def test_stored_models_and_checkpoints_are_written_durably(tmp_path, disk_log):
    model = torch.nn.Linear(3, 2)
    store = ModelStore(tmp_path / "models")
    store.publish("k", model, {"seed": 1}, {"epoch": 1})
    disk_log.assert_replaced_durably(tmp_path / "models" / "k" / "best_model.pt")
    disk_log.assert_replaced_durably(tmp_path / "models" / "k" / META_FILE)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = save_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, config={"seed": 1}, epoch=2,
                           loop={}, task={}, rng={})
    assert path == tmp_path / "ckpt" / CHECKPOINT_FILE
    disk_log.assert_replaced_durably(path)
    assert load_checkpoint(tmp_path / "ckpt")["epoch"] == 2 and leftovers(tmp_path / "ckpt") == []


def test_the_search_state_and_a_toy_corpus_are_written_durably(tmp_path, disk_log):
    cfg = StudyConfig(name="s", task="lm", preset="tiny", storage=str(tmp_path))
    search = StudySearch.__new__(StudySearch)
    search.__setstate__({"study_cfg": cfg, "root": str(tmp_path), "space": DefineByRun((), {}),
                         "sampler": optuna.samplers.TPESampler(seed=1), "asked": {"a": 3}})
    search.save_to_dir(str(tmp_path), "now")
    saved = tmp_path / search.CKPT_FILE_TMPL.format("now")
    disk_log.assert_replaced_durably(saved)
    restored = StudySearch.__new__(StudySearch)
    restored.restore(str(saved))
    assert restored.asked == {"a": 3}

    corpus = generate_once(tmp_path / "toy", lambda d: toy_grammar_corpus(d, seed=0, n_train=5, n_valid=2, n_test=2))
    disk_log.assert_directory_replaced_durably(corpus)
    assert generate_once(corpus, lambda d: pytest.fail("written twice")) == corpus   # present: not written again
    assert len((corpus / "train.txt").read_text().splitlines()) == 5 and leftovers(tmp_path) == []


def test_a_corpus_another_trial_wrote_first_is_kept(tmp_path):
    def racing(directory):   # another trial renames its corpus into place while this one writes
        toy_grammar_corpus(directory, seed=0, n_train=3, n_valid=1, n_test=1)
        toy_grammar_corpus(tmp_path / "toy", seed=0, n_train=4, n_valid=1, n_test=1)

    generate_once(tmp_path / "toy", racing)
    assert len((tmp_path / "toy" / "train.txt").read_text().splitlines()) == 4 and leftovers(tmp_path) == []
    def disk_full(directory):
        (directory / "train.txt").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(durable.FileNotWrittenError, match=f"^could not write {tmp_path / 'other'}: No space left"):
        generate_once(tmp_path / "other", disk_full)   # an error, not a corpus taken for another trial's
    assert not (tmp_path / "other").exists() and leftovers(tmp_path) == []
