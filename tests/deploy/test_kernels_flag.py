"""qwen35-ray serve --kernels: the model's kernel backend reaches the engine's config."""

import shlex

import pytest

from qwen35_ray.deploy.serve_flags import translate
from qwen35_ray.deploy.serve_parser import ServeFlagError
from qwen35_ray.engine.config import EngineConfig
from qwen35_ray.serving.config import AppConfig


def engine_of(line: str):
    config = translate(shlex.split(line), cuda_available=lambda: False, environ={}).config
    return AppConfig.model_validate(config["applications"][0]["args"]).engine


@pytest.mark.parametrize("kernels", ["auto", "torch", "triton"])
def test_the_flag_reaches_the_engine_config(kernels):
    engine = engine_of(f"qwen35-tiny --kernels {kernels}")
    assert engine.kernels == kernels
    assert EngineConfig(**engine.engine_kwargs).kernels == kernels


def test_without_the_flag_the_engine_chooses_by_device():
    assert engine_of("qwen35-tiny").kernels == "auto"


def test_an_unknown_backend_is_an_error_naming_the_flag():
    with pytest.raises(ServeFlagError, match="--kernels.*invalid choice: 'cuda'"):
        engine_of("qwen35-tiny --kernels cuda")
