"""Validate a trained fold: ``python scripts/validate.py run --config_file configs/hyper_parameters.yaml``.

Runs ``diffcl_algo.auto3dseg.validate``: ``model.pt`` on the fold's validation cases, metrics in
``validate#output_path``.
"""

from __future__ import annotations

from diffcl_algo.auto3dseg import validate as run

if __name__ == "__main__":
    import fire

    fire.Fire({"run": run})
