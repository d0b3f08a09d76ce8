import pytest

from embedding_worker.config import BUNDLED_MODEL_ID, ConfigError, bundled_model_path, load_settings

VARS = ["MODEL_NAMES", "SERVED_MODEL_NAMES", "BATCH_SIZES", "BACKEND", "DTYPES", "DEVICE",
        "INFINITY_QUEUE_SIZE", "MAX_INPUT_ITEMS", "PROMPTS"]


@pytest.fixture
def env(monkeypatch):
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_defaults_serve_the_bundled_model(env):
    settings = load_settings()
    (spec,) = settings.models
    assert spec.served_name == BUNDLED_MODEL_ID
    assert spec.source == bundled_model_path() and spec.bundled
    assert (spec.batch_size, spec.dtype) == (32, "auto")
    assert settings.backend == "auto" and settings.infinity_queue_size == 48000
    assert settings.max_input_items == 2048


def test_per_model_lists(env):
    env.setenv("MODEL_NAMES", "BAAI/bge-small-en-v1.5; patrickjohncyh/fashion-clip")
    env.setenv("SERVED_MODEL_NAMES", "small;clip")
    env.setenv("BATCH_SIZES", "32;16")
    env.setenv("DTYPES", "fp16;auto")
    a, b = load_settings().models
    assert (a.source, a.served_name, a.batch_size, a.dtype) == ("BAAI/bge-small-en-v1.5", "small", 32, "float16")
    assert (b.source, b.served_name, b.batch_size, b.dtype) == ("patrickjohncyh/fashion-clip", "clip", 16, "auto")
    assert not a.bundled


def test_single_value_applies_to_every_model(env):
    env.setenv("MODEL_NAMES", "a/b;c/d;e/f")
    env.setenv("BATCH_SIZES", "8")
    assert [m.batch_size for m in load_settings().models] == [8, 8, 8]
    assert [m.served_name for m in load_settings().models] == ["a/b", "c/d", "e/f"]


@pytest.mark.parametrize(
    "var, value, expected",
    [
        ("BATCH_SIZES", "32;16", "BATCH_SIZES='32;16': 2 entries, expected 1 or 3"),
        ("BATCH_SIZES", "abc", "BATCH_SIZES='abc': 'abc' is not a positive integer"),
        ("BATCH_SIZES", "0", "'0' is not a positive integer"),
        ("DTYPES", "fp64", "DTYPES='fp64': 'fp64' is not a dtype"),
        ("DTYPES", "auto;auto", "DTYPES='auto;auto': 2 entries, expected 1 or 3"),
        ("SERVED_MODEL_NAMES", "x;y", "SERVED_MODEL_NAMES='x;y': 2 entries, expected 3"),
        ("SERVED_MODEL_NAMES", "x;x;y", "names must be non-empty and unique"),
        ("BACKEND", "tensorrt", "BACKEND='tensorrt': expected one of auto, torch, optimum, ctranslate2"),
        ("DEVICE", "tpu", "DEVICE='tpu': expected one of"),
        ("INFINITY_QUEUE_SIZE", "-1", "INFINITY_QUEUE_SIZE='-1': Input should be greater than or equal to 1"),
        ("MAX_INPUT_ITEMS", "many", "MAX_INPUT_ITEMS='many': Input should be a valid integer"),
        ("MODEL_NAMES", "a/b;;c/d", "MODEL_NAMES='a/b;;c/d': empty entry"),
    ],
)
def test_mistakes_name_variable_value_and_expectation(env, var, value, expected):
    env.setenv("MODEL_NAMES", "a/b;c/d;e/f")
    env.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_the_onnx_backend_takes_float32_only(env):
    env.setenv("MODEL_NAMES", "a/b;c/d")
    env.setenv("DTYPES", "auto;bf16")
    load_settings()  # valid with torch
    env.setenv("BACKEND", "optimum")
    with pytest.raises(ConfigError, match="DTYPES='auto;bf16': BACKEND=optimum runs the exported "
                                          "float32 model; expected auto or fp32"):
        load_settings()
    env.setenv("DTYPES", "auto;fp32")
    assert [m.dtype for m in load_settings().models] == ["auto", "float32"]


def test_prompts_per_model_keep_their_text_exactly(env):
    env.setenv("MODEL_NAMES", "a/b;c/d")
    env.setenv("PROMPTS", "query=query: |document=passage: ; query = Represent this: ")
    a, b = load_settings().models
    assert a.prompts == (("query", "query: "), ("document", "passage: "))
    assert b.prompts == (("query", " Represent this: "),)
    env.setenv("PROMPTS", "q=x")
    assert [m.prompts for m in load_settings().models] == [(("q", "x"),)] * 2
    env.setenv("PROMPTS", ";q=x")
    assert [m.prompts for m in load_settings().models] == [(), (("q", "x"),)]


@pytest.mark.parametrize("value, message", [
    ("query", "PROMPTS='query': 'query' is not name=text"),
    ("=passage", "PROMPTS='=passage': '=passage' is not name=text"),
    ("a=1;b=2;c=3", "PROMPTS='a=1;b=2;c=3': 3 entries, expected 1 or 2"),
])
def test_bad_prompts_are_one_line(env, value, message):
    env.setenv("MODEL_NAMES", "a/b;c/d")
    env.setenv("PROMPTS", value)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as err:
        load_settings()
    assert "\n" not in str(err.value)
