"""Inference of a trained fold: ``InferClass`` (``BundleAlgo.predict``, the AutoRunner ensemble) and
``python scripts/infer.py run --config_file configs/hyper_parameters.yaml`` (label maps of the
``infer#data_list_key`` images written to ``infer#output_path``).
"""

from __future__ import annotations

from typing import Any, Sequence, Union

from diffcl_algo.auto3dseg import InferClass

__all__ = ["InferClass", "run"]


def run(config_file: Union[str, Sequence[str]], **override: Any) -> list[str]:
    """Segment the datalist's ``infer#data_list_key`` images; returns the written files."""
    return InferClass(config_file, **override).infer_all()


if __name__ == "__main__":
    import fire

    fire.Fire({"run": run})
