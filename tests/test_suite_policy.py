"""The suite's own rules (tests/conftest.py): under CI=true a skip for want of data, a package or privileges is a
failure naming what was missing, a skip for hardware no CI machine has stays a skip, and skips are counted by
reason."""

from __future__ import annotations

import pytest

from tests import conftest


def skipped_report(reason: str) -> pytest.TestReport:
    return pytest.TestReport("tests/test_x.py::test_y", ("tests/test_x.py", 1, "test_y"), {}, "skipped",
                             ("tests/test_x.py", 2, f"Skipped: {reason}"), "call")


def test_under_ci_a_skip_for_missing_data_fails_naming_it(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", True)
    report = skipped_report("shared test data not present: /nowhere/alpaca")
    conftest.fail_a_gap_in_ci(report)
    assert report.failed and "shared test data not present: /nowhere/alpaca" in str(report.longrepr)


def test_under_ci_a_skip_for_want_of_a_gpu_stays_a_skip(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", True)
    report = skipped_report("needs a CUDA device: compares CUDA and CPU nf4")
    conftest.fail_a_gap_in_ci(report)
    assert report.skipped


def test_outside_ci_a_skip_stays_a_skip(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", False)
    report = skipped_report("nola[peft] extra not installed")
    conftest.fail_a_gap_in_ci(report)
    assert report.skipped


def test_shared_data_names_the_missing_file(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)
    with pytest.raises(pytest.skip.Exception, match=f"shared test data not present: {tmp_path}/alpaca"):
        conftest.shared_data("alpaca")
