"""The shared names: one list, and everything that checks or lays out names follows it."""

from __future__ import annotations

import typing

import pytest

from pipeline import names, params
from pipeline.errors import CxrError
from pipeline.preprocess import PreprocessConfig


def test_model_registry_is_exactly_the_named_models_in_order():
    from pipeline.networks import NETWORKS as MODELS

    assert tuple(MODELS) == names.MODEL_NAMES


def test_params_type_checks_are_built_from_the_names():
    hints = typing.get_type_hints(params.Params)
    assert typing.get_args(hints["model"]) == names.MODEL_NAMES
    assert typing.get_args(hints["variant"]) == names.VARIANTS
    assert typing.get_args(typing.get_type_hints(params.EvaluateParams)["threshold_rule"]) == names.THRESHOLD_RULES
    assert typing.get_args(typing.get_type_hints(params.PreprocessParams)["equalize"]) == names.EQUALIZE_METHODS


def test_every_model_has_a_display_name_and_the_study_tables_cover_it():
    from train.report.tables import load_published

    table_v = load_published()["study"]["tables"]["V"]["data"]
    assert set(names.MODEL_DISPLAY) == set(names.MODEL_NAMES) == set(table_v)


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(CxrError, match="valid: plain, equalized"):
        PreprocessConfig.for_variant(typing.cast(params.PreprocessParams, None), "sharpened")
