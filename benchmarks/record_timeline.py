"""Record what a running study's directory says, second by second, for the ETA replay (tests/test_eta.py).

    python benchmarks/record_timeline.py STUDY_DIR OUT.json [--every 1.0]

Polls `progress/`, `live/` and `estimate.json` (study.paths) until the study's driver has finished (the
estimate file stops changing and no trial runs) or Ctrl-C, then writes the events a driver sees, in time order:

    {"t": ..., "kind": "start", "trial": id, "plan": ..., "epochs": N, "shape": [epochs, rows, tokens]}
    {"t": ..., "kind": "live", "trial": id, "live": {LiveProgress fields}}
    {"t": ..., "kind": "epoch", "trial": id, "epoch": k, "epoch_time_s": s}
    {"t": ..., "kind": "end", "trial": id, "status": ..., "reused": bool}
    {"t": ..., "kind": "eta", "eta_s": what the bar showed}

The shapes come from the study's saved config (study.json). Kilobytes: the recorded quickstart is committed as
tests/data/quickstart_timeline.json.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from study.config import StudyConfig
from study.eta import trial_shape
from study.live import read_live
from study.paths import StudyPaths, read_state
from study.progress import read_progress, trial_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--every", type=float, default=1.0)
    args = parser.parse_args()
    paths = StudyPaths(args.study_dir)
    while not paths.state.exists():
        time.sleep(args.every)
    cfg = StudyConfig.from_json(read_state(paths).config)
    events, seen, epochs, ended, lives, eta_at = [], set(), {}, set(), {}, None
    idle_since = None
    try:
        while True:
            for trial_id, p in read_progress(paths.root).items():
                if trial_id not in seen:
                    seen.add(trial_id)
                    shape = trial_shape(trial_config(_config_of(cfg, p)) or cfg.base_trial())
                    events.append({"t": p.started, "kind": "start", "trial": trial_id, "plan": p.plan,
                                   "waits_for": p.waits_for, "epochs": p.epochs, "shape": list(asdict(shape).values())})
                if p.epoch > epochs.get(trial_id, p.resumed_at) and p.epoch_time_s:
                    epochs[trial_id] = p.epoch
                    events.append({"t": p.updated, "kind": "epoch", "trial": trial_id, "epoch": p.epoch,
                                   "epoch_time_s": p.epoch_time_s})
                if p.state != "running" and trial_id not in ended:
                    ended.add(trial_id)
                    events.append({"t": p.updated, "kind": "end", "trial": trial_id, "status": p.state,
                                   "reused": p.plan != "trains"})
            for trial_id, live in read_live(paths.live).items():
                if lives.get(trial_id) != live.updated:
                    lives[trial_id] = live.updated
                    events.append({"t": live.updated, "kind": "live", "trial": trial_id, "live": asdict(live)})
            if paths.estimate.exists():
                estimate = json.loads(paths.estimate.read_text())
                if estimate["at"] != eta_at:
                    eta_at = estimate["at"]
                    events.append({"t": estimate["at"], "kind": "eta", "eta_s": estimate["eta_s"]})
            running = seen - ended
            idle_since = (idle_since or time.time()) if seen and not running else None
            if idle_since and time.time() - idle_since > 30:
                break
            time.sleep(args.every)
    except KeyboardInterrupt:
        pass
    events.sort(key=lambda e: e["t"])
    args.out.write_text(json.dumps({"study": cfg.name, "slots": cfg.max_concurrent, "total": cfg.total_samples(),
                                    "events": events}, indent=0))
    print(f"{len(events)} events -> {args.out}")


def _config_of(cfg: StudyConfig, progress) -> dict:
    """The trial's flat config as far as its progress file tells (its knobs): the base trial and its gate mode."""
    flat = cfg.base_trial().to_flat()
    mode = progress.knobs.split()[0]
    return {**flat, "g2.gate_mode": mode} if mode in ("lstm", "g2", "sharpened") else flat


if __name__ == "__main__":
    main()
