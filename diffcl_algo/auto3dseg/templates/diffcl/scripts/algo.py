"""``DiffclAlgo``: the Diff-CL Auto3DSeg algorithm (``BundleGen(algos=["diffcl"])`` imports
``diffcl.scripts.algo.DiffclAlgo`` from the copied template folder).

Filling and the skip check live in ``diffcl_algo.auto3dseg.config``; training, inference and the score are
``BundleAlgo``'s: ``python scripts/train.py run --config_file ...`` (subprocess), ``scripts/infer.py``'s
``InferClass``, and ``<ckpt_path>/progress.yaml``'s ``best_avg_dice_score``.
"""

from __future__ import annotations

from typing import Any

from monai.apps.auto3dseg import BundleAlgo

from diffcl_algo.auto3dseg.config import fill_hyper_parameters, skip_reason


class DiffclAlgo(BundleAlgo):
    """Diff-CL (CS + DS networks, semi-supervised) as an Auto3DSeg ``BundleAlgo``."""

    def fill_template_config(self, data_stats_filename: str, algo_path: str, **kwargs: Any) -> dict:
        """Write the data-derived values and ``kwargs`` (e.g. ``fold``) into ``configs/hyper_parameters.yaml``.

        ``fill_with_datastats=False`` (HPO copies) reuses the earlier ``fill_records``.

        Returns:
            ``{"hyper_parameters.yaml": {key: value}}``.
        """
        return fill_hyper_parameters(algo_path, data_stats_filename, self.data_list_file, self.fill_records, **kwargs)

    def pre_check_skip_algo(self, skip_bundlegen: bool = False, skip_info: str = "") -> tuple[bool, str]:
        """Skip data the template cannot train on (multi-channel images)."""
        reason = skip_reason(self.data_stats_files or None)
        return (True, reason) if reason else (skip_bundlegen, skip_info)


if __name__ == "__main__":
    import fire

    fire.Fire({"DiffclAlgo": DiffclAlgo})
