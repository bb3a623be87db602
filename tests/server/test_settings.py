from pathlib import Path

import pytest
from pydantic import ValidationError

from exitserve.server.settings import Settings


def test_environment_variables_use_the_exitserve_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXITSERVE_DEFAULT_BUDGET", "0.4")
    monkeypatch.setenv("EXITSERVE_MODEL_REPOSITORY", "/srv/models")
    monkeypatch.setenv("EXITSERVE_MAX_FILES", "8")
    settings = Settings()
    assert settings.default_budget == 0.4 and settings.model_repository == Path("/srv/models")
    assert settings.max_files == 8


def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXITSERVE_DEFAULT_BUDGET", "1.5")
    with pytest.raises(ValidationError):
        Settings()
