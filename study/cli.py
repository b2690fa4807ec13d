"""`g2-study`: launch, resume and inspect G2-LSTM compression studies.

    g2-study run [CONFIG.toml] [--set key=value ...] [--quiet]   (no config: study/configs/quickstart.toml)
    g2-study resume NAME [--address A] [--quiet]        (after Ctrl-C, a killed driver or cluster, a crash)
    g2-study status NAME [--format table|json]          (while it runs, after it finished or crashed)
    g2-study results NAME [--front] [--where EXPR] [--columns a,b] [--format table|csv|json|parquet]
    g2-study ui NAME                                    (the MLflow UI on 127.0.0.1)
    g2-study check CONFIG.toml                          (validate only)
    g2-study export NAME (--trial ID | --where EXPR | --knee) --output DIR   (a row's packed model; study/export.py)
    g2-study mlflow-server --storage DIR [--host H] [--port P]   (MLflow with authentication, for a cluster)
    g2-study submit CONFIG.toml --address http://HEAD:8265 --storage DIR   (a Ray Job; study/jobs.py)
    g2-study status NAME --address http://HEAD:8265     (a submitted study, from the laptop)
    g2-study logs NAME --address http://HEAD:8265 [--follow]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import sys
from pathlib import Path

import optuna
import pyarrow as pa

from analysis import fidelity
from study import export as export_command
from study import jobs, mlflow_server, results
from study.claim import StudyBusyError
from study.config import DEFAULT_STORAGE, StudyConfig, load_study_config
from study.front import format_front, front_plot, metric_name_of, readable_floats, study_front
from study.links import trial_ids, with_ids
from study.paths import StudyPaths, StudyStateError, StudyStoppedError, read_state
from study.results.filters import FilterError
from study.status import study_status
from study.tracking import UI_PORT, find_experiment_id, runs_view_url, ui_server
from trainables.config import SMOKE
from trainables.durable import not_written
from trainables.report import HIGHER_IS_BETTER

QUICKSTART = Path(__file__).resolve().parent / "configs" / "quickstart.toml"
STUDY_SMOKE = ["study.num_samples=4", *(f"{field}={json.dumps(value)}" for field, value in SMOKE.items())]
EXIT_BAD_INPUT = 2          # invalid config, or the study cannot be run now (finished, being run by another driver)
EXIT_INTERRUPTED = 130      # Ctrl-C, as a shell reports SIGINT: the study can be resumed
EXIT_NOT_WRITTEN = 74       # sysexits' EX_IOERR: a file could not be written (a full disk); a study can be resumed


def _config_args(parser: argparse.ArgumentParser, config_required: bool,
                 address_help: str = "Ray address ('auto' joins the running cluster); default: local Ray") -> None:
    parser.add_argument("config", type=Path, nargs=None if config_required else "?",
                        help="study TOML" + ("" if config_required else " (default: the quickstart study)"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field: study.num_samples=4, g2.p=0.5 (a fixed trial field), "
                             "space.g2.tau.high=2.0; repeatable")
    parser.add_argument("--address", help=address_help)
    parser.add_argument("--storage", help="where studies live: a path shared by all nodes (default: ./studies)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. http://127.0.0.1:5000 "
                                               "(default: sqlite in the study directory)")
    parser.add_argument("--num-samples", type=int, help="trials to run (on a finished study: how many to add)")
    parser.add_argument("--smoke", action="store_true", help="4 trials of 2 short epochs and a small sweep (CI)")


def _executable_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executable", default="g2-study", metavar="PATH",
                        help="g2-study on the head (default: the one on the PATH of the head's `ray start`)")


def _quiet_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="one line per finished trial only (no start and epoch lines, no progress bar)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2-study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a study (or extend a finished one)")
    _config_args(run, config_required=False)
    _quiet_arg(run)
    _config_args(sub.add_parser("check", help="validate a study config and print it"), config_required=False)
    resume = sub.add_parser("resume", help="continue an interrupted study")
    resume.add_argument("name")
    resume.add_argument("--storage", default=DEFAULT_STORAGE)
    resume.add_argument("--address", help="the Ray cluster to continue on, when it is not the one the study "
                                          "started on ('auto': the running one)")
    resume.add_argument("--tracking-uri", help="the MLflow server, when it moved (the same runs' store)")
    _quiet_arg(resume)
    status = sub.add_parser("status", help="every trial's state, the front so far, time used and ETA")
    status.add_argument("name")
    status.add_argument("--storage", default=DEFAULT_STORAGE)
    status.add_argument("--format", choices=["table", "json"], default="table")
    status.add_argument("--ids", action="store_true", help="each trial's Optuna trial number and MLflow run too")
    status.add_argument("--address", help="the Ray job server of a submitted study (http://HEAD:8265): the status "
                                          "of its job, and of the study as the head sees it")
    _executable_arg(status)
    submit = sub.add_parser("submit", help="run a study on a cluster as a Ray Job, from a laptop")
    _config_args(submit, config_required=True, address_help="the Ray job server, e.g. http://127.0.0.1:8265 "
                                                            "(the head's dashboard port, through an SSH tunnel)")
    _executable_arg(submit)
    logs = sub.add_parser("logs", help="the driver's output of a submitted study")
    logs.add_argument("name")
    logs.add_argument("--address", required=True, help="the Ray job server, e.g. http://127.0.0.1:8265")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    res = sub.add_parser("results", help="print or export a study's results")
    res.add_argument("name")
    res.add_argument("--storage", default=DEFAULT_STORAGE)
    res.add_argument("--front", action="store_true", help="only the Pareto front of the study's objectives")
    res.add_argument("--where", metavar="EXPR",
                     help="rows to keep: comparisons of columns with values, and/or/not, in [...], == None "
                          "(no code runs; see study/results/filters.py), e.g. \"status == 'ok' and 0.5 < g2.tau <= 2\" or "
                          "\"method in ['svd', 'quant'] and `compress.rank` >= 8\"")
    res.add_argument("--columns", metavar="A,B,...", type=_column_list,
                     help="only these columns, in this order (`g2-study results NAME --format json` lists them all)")
    res.add_argument("--format", choices=["table", "csv", "json", "parquet", "png"], default="table",
                     help="json: a list of records, one per row; png: the front per gate mode, drawn over the "
                          "selected rows (needs --output)")
    res.add_argument("--output", type=Path, help="file to write (required for parquet)")
    res.add_argument("--ids", action="store_true",
                     help="add each row's Optuna trial number, MLflow run id and link (after trial_id)")
    compare = sub.add_parser("compare", help="the paper's compression tables and gate saturation beside a study's "
                                             "(markdown; docs/fidelity.md)")
    compare.add_argument("names", nargs="+", metavar="NAME")
    compare.add_argument("--storage", default=DEFAULT_STORAGE)
    ui = sub.add_parser("ui", help="serve the study's MLflow runs on 127.0.0.1")
    ui.add_argument("name")
    ui.add_argument("--storage", default=DEFAULT_STORAGE)
    ui.add_argument("--port", type=int, default=UI_PORT)
    export_command.add_parser(sub)
    mlflow_server.add_parser(sub)
    return parser


def package_version() -> str:
    try:
        return importlib.metadata.version("g2-study")
    except importlib.metadata.PackageNotFoundError:   # run from a checkout that was never installed
        return "unknown (not installed)"


def _column_list(text: str) -> list[str]:
    columns = [c.strip() for c in text.split(",") if c.strip()]
    if not columns:
        raise argparse.ArgumentTypeError("expected column names separated by commas")
    return columns


def toml_value(value) -> str:
    """`value` as TOML writes it: "strings" in double quotes, true/false, [1, 2] for lists and tuples."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)   # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else \
            ("nan" if value != value else "inf" if value > 0 else "-inf")
    return str(value)


def runner():
    """study.runner, imported only by the commands that run a study: it loads Ray and Optuna (seconds)."""
    import study.runner

    return study.runner


def load_from_args(args: argparse.Namespace, address: str | None = None):
    """The study the arguments name; `address` replaces --address (a submitted study's driver joins its cluster)."""
    overrides = (STUDY_SMOKE if args.smoke else []) + args.overrides
    cli = {"address": address or args.address, "storage": args.storage, "tracking_uri": args.tracking_uri,
           "num_samples": args.num_samples}
    return load_study_config(args.config or (QUICKSTART if args.command == "run" else None), overrides, **cli)


def saved_config(name: str, storage: str):
    return StudyConfig.from_json(read_state(StudyPaths.named(storage, name)).config)


def cmd_results(args: argparse.Namespace) -> int:
    cfg = saved_config(args.name, args.storage)
    try:
        df = results.load(str(StudyPaths.named(args.storage, args.name).root), filters=args.where)
    except pa.ArrowException as err:   # a filter the language accepts but Arrow cannot evaluate on these columns
        raise FilterError(f"invalid filter {args.where!r}: {err}") from None
    metric = metric_name_of(df)
    if args.format == "png":
        if args.output is None:
            raise ValueError("--format png needs --output FILE")
        if front_plot(df, cfg, args.output) is None:
            raise ValueError(f"study {args.name} has no ok rows to draw")
        return 0
    if args.front:
        df = study_front(df, cfg)
    if args.ids:
        df = with_ids(df, trial_ids(cfg, StudyPaths.named(args.storage, args.name).root))
    if args.columns:
        unknown = [c for c in args.columns if c not in df.columns]
        if unknown:
            raise ValueError(f"unknown column(s) {', '.join(map(repr, unknown))} in --columns; "
                             f"columns are {', '.join(df.columns)}")
        df = df[args.columns]
    if args.format == "parquet":
        if args.output is None:
            raise ValueError("--format parquet needs --output FILE")
        df.to_parquet(args.output, index=False)
        return 0
    if args.format in ("csv", "json"):
        text = df.to_csv(index=False) if args.format == "csv" else \
            df.to_json(orient="records", date_format="iso", force_ascii=False, indent=1) + "\n"
    elif args.front and not args.columns:
        text = format_front(df, metric) + "\n"
    else:
        text = readable_floats(df).to_string(index=False, max_cols=None if args.columns else 30) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()   # a closed pipe fails here, inside main, not in the interpreter's exit
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    for name in args.names:
        saved_config(name, args.storage)   # an unknown study is an error that names it
        df = results.load(str(StudyPaths.named(args.storage, name).root))
        if df.empty:
            raise ValueError(f"study {name} has no finished trial yet: nothing to compare")
        sys.stdout.write(fidelity.report(df, name) + "\n")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.address:
        extra = ["--format", args.format, *(["--ids"] if args.ids else [])]
        job, output = jobs.remote_status(args.address, args.name, args.executable, extra)
        if args.format == "json":   # stdout stays one JSON document
            print(job.line(), file=sys.stderr, flush=True)
        else:
            print(job.line() + "\n", flush=True)
        sys.stdout.write(output)
        sys.stdout.flush()
        return 0
    status = study_status(args.storage, args.name, ids=args.ids)
    print(json.dumps(status.to_json(), indent=1) if args.format == "json" else status.to_table(), flush=True)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    jobs.job_server_url(args.address)
    cfg = load_from_args(args, address="auto")      # refused here, before anything reaches the cluster
    submission_id = jobs.submit(cfg, args.config, args.address, args.overrides, args.num_samples,
                                args.smoke, args.executable)
    print(f"submitted study {cfg.name} as Ray Job {submission_id}; it runs on the cluster to the end. Follow it "
          f"with:\n{jobs.follow_hint(args.address, cfg.name)}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the study's MLflow store on 127.0.0.1 and print the link to its training-runs view.

    MLflow 3 opens on its GenAI traces page; the printed link goes straight to the study's runs.
    """
    cfg = saved_config(args.name, args.storage)
    uri = StudyPaths.named(args.storage, args.name).tracking_uri(cfg)
    server = ui_server(uri, args.port)
    experiment = find_experiment_id(uri, cfg.name)
    link = runs_view_url(server, experiment, higher_is_better=HIGHER_IS_BETTER[cfg.task]) if experiment else server
    charts = f"\n  the study converging: {runs_view_url(server, experiment, charts=True)}" if experiment else ""
    if server == uri:
        print(f"study {args.name} is tracked by an MLflow server: open {link}{charts}")
        return 0
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(args.port),
               "--backend-store-uri", uri, "--workers", "1"]
    print(f"MLflow UI for study {args.name}: {link}  (Ctrl-C stops it){charts}", flush=True)
    os.execve(sys.executable, command, env)   # become the server, so Ctrl-C and SIGTERM reach it directly


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    try:
        if args.command in ("run", "check"):
            cfg = load_from_args(args)          # every field is validated before anything is created
            if args.command == "check":
                for key, value in cfg.to_flat().items():
                    print(f"{key} = {toml_value(value)}")
                print(f"\nconfig OK: {cfg.total_samples()} trial(s); trial fields:")
                for key, value in cfg.base_trial().to_flat().items():
                    print(f"  {key} = {toml_value(value)}")
                return 0
            return _exit_code(runner().run_study(cfg, quiet=args.quiet))
        if args.command == "resume":
            return _exit_code(runner().resume_study(args.name, args.storage, address=args.address,
                                                        tracking_uri=args.tracking_uri, quiet=args.quiet))
        if args.command == "results":
            return cmd_results(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "export":
            return export_command.run(args)
        if args.command == "submit":
            return cmd_submit(args)
        if args.command == "logs":
            return jobs.print_logs(args.address, args.name, args.follow)
        if args.command == "mlflow-server":
            return mlflow_server.run(args)
        return cmd_ui(args)
    except (ValueError, FilterError, StudyStateError, StudyBusyError) as err:
        print(f"g2-study {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StudyStoppedError as err:
        print(f"g2-study {args.command}: error: {err}", file=sys.stderr)
        return EXIT_NOT_WRITTEN
    except BrokenPipeError:   # `g2-study status NAME | head`: the reader took what it wanted and left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit's flush
        return 0
    except KeyboardInterrupt:   # a second Ctrl-C, or one before Ray Tune took over the signal
        if args.command in ("run", "resume"):
            where = f"{args.name} --storage {args.storage}" if args.command == "resume" else "NAME --storage DIR"
            print(f"g2-study {args.command}: interrupted; continue the study with `g2-study resume {where}`",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:   # a full disk anywhere (Ray Tune's state, a database): one line, not a traceback
        if (unwritten := not_written(err)) is None:
            raise
        resume = f"; once there is space, continue the study with `g2-study resume {args.name} --storage " \
                 f"{args.storage}`" if args.command == "resume" else ""
        print(f"g2-study {args.command}: error: {unwritten}{resume}", file=sys.stderr)
        return EXIT_NOT_WRITTEN


def _exit_code(outcome) -> int:
    """130 when interrupted (resumable), 1 when every trial failed, else 0."""
    if outcome.interrupted:
        return EXIT_INTERRUPTED
    return 1 if outcome.all_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
