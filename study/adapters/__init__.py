"""What the study uses of its libraries beyond their public API, one module per library, each checked.

    ray_tune.py     a restored Tuner's callbacks and searcher; the layout of Tune's experiment-state JSON

(Optuna needs none: the study's searcher, `study.search`, uses its public ask-and-tell and storage APIs.)

Each reaches into a private detail that no public API offers (each module names the upstream issue, where there is
one). `check()` in each raises `LibraryChanged`, naming what moved, when an upgrade changes it: the suite calls it on
the pinned versions (tests/test_adapters.py), and the study calls it before it starts.
"""


class LibraryChanged(RuntimeError):
    """A private detail of a library that the study relies on is not where the adapter expects it."""
