"""The inference room: the sliding-window inferer (:mod:`~diffcl_algo.inference.inferer`), the bundles' pre- and
postprocessing chains (:mod:`~diffcl_algo.inference.chains`) and prediction from Python
(:mod:`~diffcl_algo.inference.predict`)."""
