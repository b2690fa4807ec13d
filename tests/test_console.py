"""The console that moves (study/console.py) and the side channel it reads (trainables/pulse.py, study/live.py)."""
from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

from study.console import PLAIN_EVERY_S, Console, RunningLine, Snapshot, bar_line
from study.live import LiveProgress, LiveWriter, read_live
from study.progress import TRAINS, StudyProgress, TrialProgress
from trainables.pulse import SCORE, TRAIN, Pulse

from conftest import REPO_ROOT

TICKING = """
import sys, time
from study.console import Console, Snapshot
from study.progress import StudyProgress
t0 = time.time()
console = Console(2, stream=sys.stdout)
assert console.live, "a pty is a terminal"
console.start_ticking(lambda: Snapshot(StudyProgress(total=2, done=0, running=2, failed=0, front=0,
                                                     elapsed_s=time.time() - t0, eta_s=300.0 - (time.time() - t0))))
time.sleep(3.3)
console.close()
"""


def read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:   # the child closed its side of the pty
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def test_the_bar_ticks_every_second_in_a_pseudo_terminal_without_a_size():
    """Nothing happens in the study for 3 s, and the bar still moves: its clock ticks at least once a second. The
    pty reports 0 columns (as `script` and some CI runners give): the bar is drawn at 80, not empty."""
    main, child = pty.openpty()   # no window size set: 0 x 0
    assert os.get_terminal_size(child).columns == 0
    proc = subprocess.Popen([sys.executable, "-c", TICKING], stdin=child, stdout=child, stderr=subprocess.PIPE,
                            cwd=REPO_ROOT, close_fds=True)
    os.close(child)
    out = read_all(main)
    assert proc.wait(30) == 0, proc.stderr.read()
    bars = [b for b in re.split(r"\r\x1b\[K", out) if b.startswith("trials ")]
    clocks = {m.group(1) for b in bars if (m := re.search(r" (\d:\d\d) elapsed", b))}
    assert {"0:01", "0:02", "0:03"} <= clocks, out   # redrawn twice a second: no second skipped
    assert len(bars) >= 6 and all(0 < len(b.strip()) <= 80 for b in bars), bars
    assert "ETA 4:5" in bars[-1] and "running 2, pending 0" not in bars[-1]


def study(elapsed: float = 75.0) -> StudyProgress:
    return StudyProgress(total=4, done=1, running=1, failed=0, front=3, elapsed_s=elapsed, eta_s=200.0,
                         counts=(("ok", 1),))


def running_line(phase: str = TRAIN, done: int = 312) -> RunningLine:
    live = LiveProgress("3f2a_00002", phase=phase, done=done, total=1327 if phase == TRAIN else 24, epoch=1,
                        tokens=done * 700 if phase == TRAIN else 0, phase_started=100.0, updated=121.0)
    return RunningLine(TrialProgress("3f2a_00002", "g2 τ=0.52 p=0.31 rank 8 bits 4", TRAINS, epochs=1), live, 95.0)


def test_the_bar_leads_with_the_clock_and_shows_each_trials_progress_within_its_epoch():
    line = bar_line(Snapshot(study(), (running_line(),)), columns=200)
    assert line == ("trials 1/4 ▕██░░░░░░░░▏ 1:15 elapsed, ETA 3:20 | 00002 batch 312/1327, 10.4k tok/s | "
                    "ok 1, running 1, pending 2 | front so far 3")
    assert "00002 scoring 5/24 | " in bar_line(Snapshot(study(), (running_line(SCORE, 5),)), columns=200)
    short = bar_line(Snapshot(study(), (running_line(), running_line(SCORE, 5))), columns=125)
    assert short == ("trials 1/4 ▕██░░░░░░░░▏ 1:15 elapsed, ETA 3:20 | 00002 24%, 00002 sweep 21% | "
                     "ok 1, running 1, pending 2 | front so far 3")   # in full it would not fit: in short
    passed = (running_line(done=1327), running_line(done=1327))   # its pass done: the validation runs
    assert "| 00002 validating | " in bar_line(Snapshot(study(), passed[:1]), columns=200)
    assert "| 00002 validating, 00002 validating | " in bar_line(Snapshot(study(), passed), columns=100)
    narrow = bar_line(Snapshot(study(), (running_line(),)), columns=40)
    assert len(narrow) <= 40 and narrow.startswith("trials 1/4 ▕██░░░░░░░░▏ 1:15 elapsed") and narrow.endswith("…")


def test_without_a_terminal_a_running_trial_gets_one_line_a_minute_at_most():
    lines: list[str] = []
    console = Console(4, printer=lines.append)
    assert not console.live
    snapshot = Snapshot(study(), (running_line(),))
    for now in (1000.0, 1030.0, 1000.0 + PLAIN_EVERY_S - 1):
        console.tick(snapshot, now=now)
    assert lines == []   # the first minute is its start line's
    console.tick(snapshot, now=1000.0 + PLAIN_EVERY_S)
    console.tick(snapshot, now=1000.0 + PLAIN_EVERY_S + 30)
    assert lines == ["trial 3f2a_00002 epoch 1/1: batch 312/1327, 10.4k tok/s | ETA 1:35"]
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", "".join(lines))   # plain text: no redraws, no escapes
    Console(4, printer=lines.append, quiet=True).tick(snapshot, now=5000.0)
    assert len(lines) == 1   # quiet: end lines only


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_trial_writes_its_live_file_at_a_bounded_rate_and_at_each_change_of_phase(tmp_path):
    clock = Clock()
    writer = LiveWriter(tmp_path, "t1", interval_s=2.0, clock=clock)
    written = []
    for batch in range(0, 50):   # a batch every 0.1 s for 5 s
        clock.now = 1000.0 + batch / 10
        writer(Pulse(TRAIN, batch, 100, tokens=batch * 700, epoch=1))
        written.append(read_live(tmp_path)["t1"].updated)
    assert sorted(set(written)) == [1000.0, 1002.0, 1004.0]   # three writes for 50 pulses
    live = read_live(tmp_path)["t1"]
    assert (live.phase, live.done, live.phase_started) == (TRAIN, 40, 1000.0)
    assert live.tokens_per_s == 40 * 700 / 4.0 and live.remaining_s() == 60 * 4.0 / 40
    writer(Pulse(SCORE, 0, 24, epoch=1))   # the sweep starts: written at once, its own clock
    live = read_live(tmp_path)["t1"]
    assert (live.phase, live.done, live.total, live.phase_started) == (SCORE, 0, 24, clock.now)


def test_pulses_reach_the_listener_and_never_become_reports(tmp_path):
    """The side channel: a trial's loops tell its pulser every batch and every scored setting, while its reports
    (what Tune, the searcher and the scheduler see) stay one per epoch."""
    from trainables.config import TrialConfig
    from trainables.trainable import run_trial

    cfg = TrialConfig.from_flat(
        {"data.corpus": "toy", "data.cache_dir": str(tmp_path / "cache"), "train.epochs": 2, "train.max_batches": 4,
         "train.max_eval_batches": 2, "sweep.ranks": [0, 8], "sweep.bits": [32], "sweep.paper": []}, base=TrialConfig.preset("lm", "tiny"))
    pulses, reports = [], []
    final = run_trial(cfg, tmp_path / "work", report=lambda r, ckpt: reports.append(r), pulse=pulses.append)
    assert len(reports) == 2 and final.sweep
    train = [p for p in pulses if p.phase == TRAIN]
    assert [(p.epoch, p.done) for p in train] == [(e, b) for e in (1, 2) for b in range(5)]   # 0: the pass starts
    scoring = [p.done for p in pulses if p.phase == SCORE]
    assert scoring == list(range(len(final.sweep) + 1))   # 0, then one per sweep row
    assert all(p.tokens > 0 for p in train if p.done)
