"""The isoFLOP study: at the same training compute, which model is better, and how much faster is each?

``run_study`` trains every preset of a study to the same training-FLOP budget (counted analytically, only
work actually done, so a routed model takes more steps than its dense twin), evaluates each, times each
against the dense preset in the same process (``condformer bench``: alternating measurements, medians),
looks inside each trained model (routed fractions, expert load, AltUp coefficients, and, on the
``synthetic:mixed-difficulty`` corpus, where each router spends compute per token class), and writes

* ``results.json``: every number (the interface; the report is rendered from it and nothing else);
* ``report.md``: the tables and the plots;
* PNG plots: validation loss vs training FLOPs, final loss vs forward FLOPs per token, measured speedup
  vs FLOP ratio, routing heatmaps, expert load, AltUp coefficients.

The study is resumable: each finished run leaves ``runs/<preset>/seed<s>/result.json`` and each finished
benchmark ``bench/<preset>-<mode>.json``; a second call with the same settings reuses them, and an
interrupted run resumes exactly from its last checkpoint. A directory that holds a study with other
settings is refused rather than overwritten.

The package is split by concern: :mod:`~condformer.compare.config` (the settings and the run layout),
:mod:`~condformer.compare.study` (the loop: train, bench, analyse, write), :mod:`~condformer.compare.analysis`
(looking inside a trained model), :mod:`~condformer.compare.report` (``report.md`` and the summary) and
:mod:`~condformer.compare.plots`. Every name the single ``condformer.compare`` module had is re-exported here
so that old imports keep working; a test that replaces a name patches the module that looks it up.
"""

from condformer.compare.analysis import HEATMAP_TOKENS
from condformer.compare.analysis import _analyse as _analyse
from condformer.compare.analysis import _experts_per_class as _experts_per_class
from condformer.compare.analysis import _per_class as _per_class
from condformer.compare.analysis import _token_classes as _token_classes
from condformer.compare.config import BUDGETS, DEFAULT_PRESETS, EXIT_TOLERANCE, TECHNIQUES, StudyConfig, run_dir
from condformer.compare.plots import make_plots
from condformer.compare.report import _fmt as _fmt
from condformer.compare.report import render_report, render_summary
from condformer.compare.study import _bench as _bench
from condformer.compare.study import _calibrate_run as _calibrate_run
from condformer.compare.study import _curve as _curve
from condformer.compare.study import _diff as _diff
from condformer.compare.study import _machine as _machine
from condformer.compare.study import _mean_or_none as _mean_or_none
from condformer.compare.study import _run as _run
from condformer.compare.study import _summarise_runs as _summarise_runs
from condformer.compare.study import _train_config as _train_config
from condformer.compare.study import run_study

__all__ = [
    "BUDGETS", "DEFAULT_PRESETS", "EXIT_TOLERANCE", "HEATMAP_TOKENS", "make_plots", "render_report",
    "render_summary", "run_dir", "run_study", "StudyConfig", "TECHNIQUES",
]
