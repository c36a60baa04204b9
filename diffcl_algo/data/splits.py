"""Which cases train (labeled / unlabeled), select the model (validation) and are reported on (evaluation).

One implementation of the split rules for every workflow of the bundles (training, evaluation, inference) and
Auto3DSeg, so that they cannot drift apart:

* the training list (``train_list``: an h5 layout's case list, or a Decathlon JSON's ``"training"`` key) loses its
  last ``num_test_holdout`` cases: the **report split**, never trained or validated on; ``report_fold`` k rotates
  the list first by ``k * num_test_holdout`` cases, so that folds 0, 1, ... report on the last, the second-last, ...
  block of ``num_test_holdout`` cases (each case reported once over the folds, never trained or selected on in its
  fold; the labeled and validation cases move with the rotation);
* without a validation list file, the last ``num_val_holdout`` cases of what remains **validate** (select
  ``model.pt``), the rest is the training **pool**; with one, the pool is all that remains and the file's cases
  validate;
* the first ``num_labeled`` cases of the pool keep their labels, the others are **unlabeled** (their labels dropped,
  or kept as ``hidden_label`` for logging only), plus the JSON's entries without a label;
* **evaluation** cases: the evaluation list file (``eval_list``; a JSON's ``"testing"`` key) when it exists, else the
  last ``num_test_holdout`` cases of the training list (the report split), else its last ``num_val_holdout``.

:class:`CaseSplits` reads a list only when a split is asked for (a workflow that needs no dataset reads none);
:func:`inference_cases` adds the inputs of inference (files, a JSON's images, or the evaluation cases unlabeled).
"""

from __future__ import annotations

import copy
import json
import os
from functools import cached_property
from typing import Any, Sequence

from monai.config import PathLike

from diffcl_algo.data.io import LIST_NAMES, DataError, build_datalists, detect_layout
from diffcl_algo.data.transforms import HIDDEN_LABEL

__all__ = ["CaseSplits", "inference_cases"]


class CaseSplits:
    """The cases of each split of a dataset (module docstring), read when first asked for.

    Args:
        dataset_dir: dataset root (h5 layout) or base folder of a JSON datalist's relative paths.
        datalist: Decathlon-style JSON (``"training"``, ``"validation"``, ``"testing"`` keys) instead of a layout.
        layout: ``la`` | ``brats`` | ``pancreas`` | None (detected from ``dataset_dir``).
        train_list, val_list, eval_list: case lists (None: the layout's first / second / last list; JSON:
            ``"training"`` / ``"validation"`` / ``"testing"``).
        num_labeled: the first N cases of the pool keep their label.
        num_val_holdout: > 0 and no ``val_list`` file: the last N cases (before the report split) validate.
        num_test_holdout: > 0: the last N cases of the training list are the report split.
        report_fold: which block of ``num_test_holdout`` cases is the report split (0: the last; module docstring).
        hidden_labels: keep the unlabeled cases' labels as ``hidden_label`` (logged only, never trained on).
        labels: the cases need their labels (training, evaluation); False: they are images to segment (inference,
            :meth:`for_inference`), and a missing folder, list or file is described as such.
    """

    def __init__(
        self,
        dataset_dir: PathLike | None,
        datalist: PathLike | None = None,
        layout: str | None = None,
        train_list: str | None = None,
        val_list: str | None = None,
        eval_list: str | None = None,
        num_labeled: int = 8,
        num_val_holdout: int = 0,
        num_test_holdout: int = 0,
        report_fold: int = 0,
        hidden_labels: bool = False,
        labels: bool = True,
    ) -> None:
        self.dataset_dir, self.datalist = dataset_dir, datalist
        self._layout = layout
        self.train_list, self.val_list_name, self.eval_list_name = train_list, val_list, eval_list
        self.num_labeled, self.num_val_holdout = int(num_labeled), int(num_val_holdout)
        self.num_test_holdout, self.hidden_labels = int(num_test_holdout), bool(hidden_labels)
        self.report_fold = int(report_fold)
        self.labels = bool(labels)

    def for_inference(self) -> CaseSplits:
        """These splits as images to segment: the same cases, errors about images rather than labeled cases."""
        splits = copy.copy(self)
        splits.labels = False
        return splits

    @cached_property
    def layout(self) -> str | None:
        """The h5 layout (None with a JSON datalist)."""
        return None if self.datalist else (self._layout or detect_layout(self.dataset_dir, self.labels))

    def _list(self, name: str | None, position: int, json_key: str) -> str:
        if name:
            return name
        return json_key if self.datalist else LIST_NAMES[self.layout][position]

    def _read(self, list_name: str) -> tuple[list[dict], list[dict]]:
        return build_datalists(
            self.dataset_dir, datalist=self.datalist, list_name=list_name, layout=self.layout, labels=self.labels
        )

    def _has_file(self, list_name: str) -> bool:
        return not self.datalist and os.path.isfile(os.path.join(self.dataset_dir, list_name))

    @cached_property
    def _training(self) -> tuple[list[dict], list[dict]]:
        labeled, unlabeled = self._read(self._list(self.train_list, 0, "training"))
        if not self.report_fold:
            return labeled, unlabeled
        shift = self.report_fold * self.num_test_holdout
        if self.num_test_holdout <= 0 or not 0 < shift < len(labeled):
            raise DataError(
                f"report_fold={self.report_fold} needs 0 < report_fold * num_test_holdout < {len(labeled)} (the "
                f"training list's cases), with num_test_holdout={self.num_test_holdout}"
            )
        return labeled[-shift:] + labeled[:-shift], unlabeled

    @cached_property
    def _kept(self) -> list[dict]:
        """The training list without the report split."""
        cases = self._training[0]
        return cases[: len(cases) - self.num_test_holdout]

    @cached_property
    def _val_holdout(self) -> bool:
        val_list = self._list(self.val_list_name, 1, "")
        return self.num_val_holdout > 0 and not self.datalist and not self._has_file(val_list)

    @cached_property
    def pool(self) -> list[dict]:
        """The cases that train (labeled and unlabeled ones)."""
        return self._kept[: len(self._kept) - self.num_val_holdout] if self._val_holdout else self._kept

    @cached_property
    def labeled(self) -> list[dict]:
        """``{"image", "label", "case"}`` of the labeled training cases."""
        return self.pool[: self.num_labeled]

    @cached_property
    def unlabeled(self) -> list[dict]:
        """``{"image", "case"[, "hidden_label"]}`` of the unlabeled training cases."""
        keep = self.hidden_labels
        stripped = [
            {(HIDDEN_LABEL if k == "label" else k): v for k, v in d.items() if k != "label" or keep}
            for d in self.pool[self.num_labeled :]
        ]
        return stripped + self._training[1]

    @cached_property
    def validation(self) -> list[dict]:
        """The cases that select ``model.pt``."""
        if self._val_holdout:
            return self._kept[len(self._kept) - self.num_val_holdout :]
        return self._read(self._list(self.val_list_name, 1, "validation"))[0]

    @cached_property
    def evaluation(self) -> list[dict]:
        """The cases an evaluation scores: the evaluation list, else the report split, else the validation hold-out."""
        name = self._list(self.eval_list_name, -1, "testing")
        holdout = self.num_test_holdout or self.num_val_holdout
        if holdout > 0 and not self.datalist and not self._has_file(name):
            return self._training[0][-holdout:]
        return self._read(name)[0]


def inference_cases(
    splits: CaseSplits,
    images: str | Sequence[str] | None = None,
    infer_list_key: str = "testing",
) -> list[dict[str, Any]]:
    """``[{"image": path[, "case"]}]`` to segment: ``images``, else the ``infer_list_key`` images of the JSON
    datalist, else the evaluation cases of the layout without their labels.

    Args:
        splits: the dataset's splits (its ``dataset_dir`` and ``datalist``).
        images: image file(s) to segment: a relative path names a file of the working directory when one is there,
            else one below ``dataset_dir``.
        infer_list_key: the JSON key of the images (entries are paths or ``{"image": path}``).
    """
    root = splits.dataset_dir or ""
    if images:
        files = [images] if isinstance(images, str) else images
        return [{"image": f if os.path.isfile(f) else os.path.join(root, f)} for f in files]
    if splits.datalist:
        with open(splits.datalist) as f:
            content = json.load(f)
        if infer_list_key not in content:
            raise DataError(f"datalist {splits.datalist} has no {infer_list_key!r} key (set --infer_list_key)")
        entries = content[infer_list_key]
        base = splits.dataset_dir or os.path.dirname(splits.datalist)
        return [{"image": os.path.join(base, d if isinstance(d, str) else d["image"])} for d in entries]
    return [{k: v for k, v in d.items() if k != "label"} for d in splits.for_inference().evaluation]
