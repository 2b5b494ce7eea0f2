"""The top-level public face re-exports the stage APIs (lazily) and nothing else."""

from __future__ import annotations

import subprocess
import sys

import pytest

import interptool


def test_every_public_name_resolves_to_the_stage_object():
    from interptool.analyzers import Dissection
    from interptool.cache import ActivationCache
    from interptool.loading import load_model

    for name in interptool.__all__:
        assert getattr(interptool, name) is not None, name
    assert interptool.load_model is load_model
    assert interptool.ActivationCache is ActivationCache
    assert interptool.Dissection is Dissection


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        interptool.nope  # noqa: B018


def test_import_does_not_load_torch():
    # the CLI's --help and config validation must not pay for importing torch
    code = "import sys, interptool; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
