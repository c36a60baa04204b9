"""The training room: ``DiffCLTrainer`` (Algorithm 1, :mod:`~diffcl_algo.training.trainer`), its checkpoint handlers
(:mod:`~diffcl_algo.training.checkpoint`) and its log / validation / progress handlers
(:mod:`~diffcl_algo.training.handlers`)."""
