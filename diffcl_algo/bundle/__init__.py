"""The bundle room: the configs' composition (:mod:`~diffcl_algo.bundle.compose`), running a workflow
(:mod:`~diffcl_algo.bundle.run`), what the configs and command lines call on values
(:mod:`~diffcl_algo.bundle.expressions`) and the model-zoo zip (:mod:`~diffcl_algo.bundle.package`)."""
