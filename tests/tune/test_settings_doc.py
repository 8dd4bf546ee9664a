"""docs/reference/settings.md's table is generated from the code and must be current (CI runs this)."""
from __future__ import annotations

import pytest

from trainables import config
from tune import settings_doc, space


def test_checked_in_settings_table_is_current():
    text = settings_doc.DOC.read_text()
    assert settings_doc.render(text) == text, "docs/reference/settings.md is not current: run python -m tune.settings_doc"


def test_table_lists_every_setting_and_space_key_with_its_meaning():
    table = settings_doc.table()
    keys = config.known_keys() + [key for key, _ in settings_doc.space_rows()]
    assert all(key in space.MEANINGS for key, _ in settings_doc.space_rows())
    for key in keys:
        assert f"| `{key}` |" in table, key
    assert len(keys) == len({row.split("`")[1] for row in table.splitlines() if row.startswith("| `")})


def test_stale_table_is_detected(tmp_path, monkeypatch):
    doc = tmp_path / "settings.md"
    doc.write_text(settings_doc.DOC.read_text().replace("| `train.epochs` | `20` |", "| `train.epochs` | `30` |"))
    monkeypatch.setattr(settings_doc, "DOC", doc)
    with pytest.raises(SystemExit, match="not current"):
        settings_doc.main(["--check"])
    settings_doc.main([])
    settings_doc.main(["--check"])
    assert "| `train.epochs` | `20` |" in doc.read_text()
