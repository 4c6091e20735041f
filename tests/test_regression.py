"""The plan and the exported weights of fixed runs are the ones recorded before the pruning code was restructured
(tests/data/regression.json, written by `python tests/regression_cases.py record` on the older code)."""

from __future__ import annotations

import json

import pytest
from regression_cases import CASES, FAST, RECORD, run_case, tiny_dirs


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return tiny_dirs(tmp_path_factory.mktemp("regression_models"))


@pytest.mark.parametrize("name", [*FAST, pytest.param("smollm2_small", marks=pytest.mark.slow)])
def test_plan_and_weights_unchanged(name, model_dirs, tmp_path):
    assert name in CASES
    recorded = json.loads(RECORD.read_text())[name]
    assert run_case(name, model_dirs, tmp_path / name) == recorded
