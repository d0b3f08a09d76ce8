"""The engine loads in the background from the moment serve mode has its settings
(`Core.preload`): the start-up hook's load waits for it and fails as it failed."""

from __future__ import annotations

import threading

import pytest

from embedding_worker.config import ConfigError, Settings
from embedding_worker.core.core import Core
from embedding_worker.engine.combined import CombinedEngine


def vision_model(tmp_path):
    model = tmp_path / "vision"
    model.mkdir()
    (model / "config.json").write_text('{"vision_config": {"hidden_size": 8}, "model_type": "clip"}')
    return model


async def test_the_load_waits_for_a_failed_preload_and_fails_as_it_did(tmp_path):
    engine = CombinedEngine(Settings(model_names=str(vision_model(tmp_path)), backend="optimum"))
    engine.preload()
    with pytest.raises(ConfigError, match="text models only"):
        engine.load()
    with pytest.raises(ConfigError, match="text models only"):
        engine.load()  # once: the same failure, not a second attempt
    await engine.start()
    assert engine.state == "failed" and "text models only" in engine.failure


async def test_the_process_core_is_the_preloaded_one_for_the_same_settings(tiny_models):
    settings = Settings(model_names=str(tiny_models["embed"]), served_model_names="tiny")
    Core.preload(settings)
    core = Core.for_process(Settings(model_names=str(tiny_models["embed"]),
                                     served_model_names="tiny"))
    await core.start()  # waits for the preload
    try:
        assert core.ready
        result = await core.embeddings.create({"model": "tiny", "input": ["a preloaded engine"]})
        assert len(result["data"]) == 1
        assert Core.for_process(settings) is not core  # handed out once
    finally:
        await core.stop()


def test_other_settings_get_a_core_of_their_own(tiny_models):
    Core.preload(Settings(model_names=str(tiny_models["embed"]), served_model_names="tiny"))
    other = Settings(model_names=str(tiny_models["embed"]), served_model_names="other")
    assert Core.for_process(other).settings.models[0].served_name == "other"


def test_torch_is_never_loaded_in_the_background(tiny_models):
    """Infinity's stack imported beside BentoML's is slower than one after the other: with torch
    to serve, nothing starts early (the start-up hook loads it)."""
    engine = CombinedEngine(Settings(model_names=str(tiny_models["embed"]), backend="torch"))
    before = set(threading.enumerate())
    engine.preload()
    assert not [t for t in set(threading.enumerate()) - before if t.name == "engine-preload"]
