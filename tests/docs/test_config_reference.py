"""docs/reference/config.md is what docs/config_reference.py writes from the config schema today."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.conftest import ROOT


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_current() -> None:
    module = generator()
    assert module.PAGE.read_text() == module.render(), "run: python docs/config_reference.py"


def test_every_note_names_a_field() -> None:
    assert generator().stale_notes() == []


def test_every_field_is_documented() -> None:
    from server.config import ModelConfig

    page = generator().PAGE.read_text()
    for name in ModelConfig.model_fields:
        assert f"| `{name}` |" in page
