"""Pareto search over edits (direction, per-component strength kernels, variants): the method, by phase.

- :mod:`~refdir.method.search.objective`: the proxy objective (refusal metric on harmful proxy prompts, first-token
  KL on harmless ones), the searched edit space, the Pareto front and the KL band TPE treats as feasible;
- :mod:`~refdir.method.search.study`: the optuna study (journal storage, warm starts from the selection, TPE trials,
  trial rows);
- :mod:`~refdir.method.search.refine`: strength refinement of front edits towards each KL mark;
- :mod:`~refdir.method.search.confirm`: confirmation of the picks by generation, with calibration to the
  confirmation prompts' KL;
- :mod:`~refdir.method.search.report`: tables, the front plot and the report section;
- :mod:`~refdir.method.search.export`: a front point as an edited checkpoint.

The proxy prompts are the run's validation split (carved from the train sources, disjoint from the candidates'
train prompts and from the confirmation sets). The workflow that prepares the run and drives these phases is
:func:`refdir.workflows.search.run_search`.
"""

from refdir.method.search.confirm import CALIBRATE_MARGIN, Confirmation, default_per_mark, front_picks
from refdir.method.search.export import export_point
from refdir.method.search.objective import Proxy, Space, kl_band, pareto_front
from refdir.method.search.refine import REFINE_MARGIN, refine_front
from refdir.method.search.report import load_reference, plot_front, reference_models, write_search_report
from refdir.method.search.study import open_study, storage, warm_starts

__all__ = ["CALIBRATE_MARGIN", "REFINE_MARGIN", "Confirmation", "Proxy", "Space", "default_per_mark", "export_point",
           "front_picks", "kl_band", "load_reference", "open_study", "pareto_front", "plot_front", "reference_models",
           "refine_front", "storage", "warm_starts", "write_search_report"]
