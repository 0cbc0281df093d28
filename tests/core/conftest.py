"""Fixtures of tests/core only (tests/conftest.py, one folder up, holds every fixture the two folders share).

The library's tests run the perplexity harness's tiny model wherever they name ``tiny_dir``: this alias, defined once
here, overrides tests/conftest.py's ``tiny_dir`` (the prompt harnesses' 4-layer model, which tests/harness uses) for
every module in this folder. It replaces the identical alias fixture seven modules here defined each."""
import pytest


@pytest.fixture(scope="module")
def tiny_dir(ppl_tiny_dir):
    """This module's runs use the perplexity harness's tiny model (conftest's ``ppl_tiny_dir``)."""
    return ppl_tiny_dir
