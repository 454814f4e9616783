"""The pipeline's report: training curves, per-checkpoint kNN, accuracy per evaluation side by side,
t-SNE of test features, last-block attention maps, and a summary table (markdown and JSON).

``mugs report --runs RUN... --out DIR`` reads, for each run directory, ``log.jsonl``,
``selection.json``, the metrics files ``knn.json``, ``linear.json``, ``fewshot.json`` and
``finetune.json`` (from ``<run>/eval`` or ``--eval-dirs``, then the run directory) and a checkpoint
(``selected.pt``, else the last kept one); whatever is missing is noted, not fatal.
"""

from mugs.report.build import find_checkpoint, run_report

__all__ = ["find_checkpoint", "run_report"]
