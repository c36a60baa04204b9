"""The evaluation room: medpy-equal metrics (:mod:`~diffcl_algo.evaluation.metrics`), evaluator handlers (metric
handlers, per-case metric files, progress: :mod:`~diffcl_algo.evaluation.handlers`) and reports of runs
(:mod:`~diffcl_algo.evaluation.report`)."""
