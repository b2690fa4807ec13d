"""The study's outputs: Parquet datasets of results, curves and gates, their schema, rows and filter language.

    files.py    one file per trial, rewritten whole; `load`, `load_curves`, `load_gates`; the driver's writer
    rows.py     the rows of each dataset, made from a trial's typed reports
    schema.py   the one Arrow schema of each dataset, derived from TrialConfig and the report vocabulary
    filters.py  the `filters=` / `--where` language (no code runs)

`from study.results import load` is the way in for analysis code and notebooks.
"""
from study.results.files import (
    CURVES_DIR,
    GATES_DIR,
    RESULTS_DIR,
    CorruptFileError,
    ResultsWriter,
    load,
    load_curves,
    load_gates,
    write_curves,
    write_gates,
    write_trial,
)

__all__ = ["CURVES_DIR", "GATES_DIR", "RESULTS_DIR", "CorruptFileError", "ResultsWriter", "load", "load_curves",
           "load_gates", "write_curves", "write_gates", "write_trial"]
