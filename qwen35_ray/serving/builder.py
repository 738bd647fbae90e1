"""build_app: Serve YAML `args` -> the collocated application (ingress + LLM server pool)."""

import pydantic
from ray import serve

from qwen35_ray.serving.config import AppConfig
from qwen35_ray.serving.ingress import OpenAIIngress
from qwen35_ray.serving.llm_server import LLMServer


def parse_args(args: dict | None) -> AppConfig:
    try:
        return AppConfig.model_validate(args or {})
    except pydantic.ValidationError as e:
        lines = [
            f"  {'.'.join(map(str, err['loc'])) or 'args'}: {err['msg']}" for err in e.errors()
        ]
        raise ValueError("invalid qwen35-ray app args:\n" + "\n".join(lines)) from None


def build_app(args: dict | None = None) -> serve.Application:
    cfg = parse_args(args)
    raw = cfg.model_dump()
    llm = serve.deployment(LLMServer, name="LLMServer", **cfg.llm_server.options()).bind(raw)
    return serve.deployment(OpenAIIngress, name="OpenAIIngress", **cfg.ingress.options()).bind(
        llm, raw
    )
