"""Train one fold: ``python scripts/train.py run --config_file configs/hyper_parameters.yaml [--key value ...]``.

Runs ``diffcl_algo.auto3dseg.train`` (the package's graph ``diffcl_algo/configs/train.yaml``).
"""

from __future__ import annotations

from diffcl_algo.auto3dseg import train as run

if __name__ == "__main__":
    import fire

    fire.Fire({"run": run})
