"""Tests of diffcl_algo.data.splits: the one implementation of the split rules of every workflow."""

from __future__ import annotations

import json
import os

import pytest

from diffcl_algo.convert import make_synthetic_dataset
from diffcl_algo.data import DataError
from diffcl_algo.data.splits import CaseSplits, inference_cases


@pytest.fixture(scope="module")
def la(tmp_path_factory):
    """12 synthetic LA cases: 10 in train.list, 2 in test.list."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("la"), num_cases=12, shape=(16, 16, 16), num_test=2)


def _cases(entries):
    return [e["case"] for e in entries]


def test_report_and_validation_holdouts_partition_the_training_list(la):
    os.rename(la / "test.list", la / "test.list.off")  # no list file: the hold-outs apply
    try:
        splits = CaseSplits(la, num_labeled=2, num_val_holdout=3, num_test_holdout=4)
        train = [line.strip() for line in (la / "train.list").read_text().split()]
        assert _cases(splits.labeled) == train[:2]
        assert _cases(splits.unlabeled) == train[2:3]
        assert _cases(splits.validation) == train[3:6]
        assert _cases(splits.evaluation) == train[6:]  # the report split, never trained or validated on
        assert all("label" not in e for e in splits.unlabeled)
        assert CaseSplits(la, num_val_holdout=3).evaluation == CaseSplits(la, num_val_holdout=3).validation
    finally:
        os.rename(la / "test.list.off", la / "test.list")


def test_list_files_win_over_holdouts(la):
    splits = CaseSplits(la, num_labeled=4, num_val_holdout=3, val_list="test.list", eval_list="test.list")
    test = (la / "test.list").read_text().split()
    assert _cases(splits.validation) == test and _cases(splits.evaluation) == test
    assert len(splits.pool) == 10  # the list exists: no validation hold-out


def test_hidden_labels_are_kept_for_logging_only(la):
    unlabeled = CaseSplits(la, num_labeled=4, hidden_labels=True).unlabeled
    assert all("label" not in e and "hidden_label" in e for e in unlabeled)


def test_nothing_is_read_until_asked(tmp_path):
    splits = CaseSplits(tmp_path / "missing", num_labeled=2)  # constructing reads nothing
    with pytest.raises(DataError, match="does not exist"):
        _ = splits.labeled


def test_json_datalist_and_inference_inputs(la, tmp_path):
    entries = [{"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"} for i in range(3)]
    datalist = tmp_path / "data.json"
    datalist.write_text(json.dumps({"training": entries + [{"image": "u.nii.gz"}], "validation": entries[:1],
                                    "testing": ["t.nii.gz", {"image": "s.nii.gz"}]}))  # fmt: skip
    splits = CaseSplits(tmp_path, datalist=datalist, num_labeled=2, num_val_holdout=5)
    assert [e["image"] for e in splits.labeled] == [str(tmp_path / f"img{i}.nii.gz") for i in range(2)]
    assert [os.path.basename(e["image"]) for e in splits.unlabeled] == ["img2.nii.gz", "u.nii.gz"]
    assert [os.path.basename(e["image"]) for e in splits.validation] == ["img0.nii.gz"]  # JSON: no hold-out
    assert inference_cases(splits) == [{"image": str(tmp_path / "t.nii.gz")}, {"image": str(tmp_path / "s.nii.gz")}]
    assert inference_cases(splits, images=["a.nrrd"]) == [{"image": str(tmp_path / "a.nrrd")}]
    with pytest.raises(DataError, match="has no 'other' key"):
        inference_cases(splits, infer_list_key="other")
    h5 = inference_cases(CaseSplits(la, eval_list="test.list"))
    assert len(h5) == 2 and all(set(e) == {"image", "case"} for e in h5)  # labels dropped


def test_a_relative_image_names_the_working_directorys_file_first(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "datalist.json").write_text(json.dumps({"testing": []}))
    splits = CaseSplits(tmp_path / "data", datalist=tmp_path / "data" / "datalist.json")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    assert inference_cases(splits, images=["scan.nii.gz", "other.nii.gz"]) == [
        {"image": "scan.nii.gz"},  # the user's file where the command runs
        {"image": str(tmp_path / "data" / "other.nii.gz")},  # none there: below dataset_dir
    ]


def test_report_folds_rotate_over_every_case_once(la):
    train = (la / "train.list").read_text().split()
    reported = []
    for fold in range(5):
        splits = CaseSplits(la, num_labeled=2, num_val_holdout=2, num_test_holdout=2, report_fold=fold,
                            val_list="none.list", eval_list="none.list")  # fmt: skip
        report = _cases(splits.evaluation)
        used = _cases(splits.labeled) + _cases(splits.unlabeled) + _cases(splits.validation)
        assert not set(report) & set(used) and len(set(report + used)) == len(train)
        reported += report
    assert sorted(reported) == sorted(train)  # each case reported once over the 5 folds
    assert _cases(CaseSplits(la, num_test_holdout=2, eval_list="none.list").evaluation) == train[-2:]  # fold 0
    with pytest.raises(DataError, match="report_fold=5"):
        _ = CaseSplits(la, num_test_holdout=2, report_fold=5).labeled
