"""Qwen3.5 serving on Ray Serve with its own PyTorch + Triton engine.

`from qwen35_ray import LLM, SamplingParams` gives the offline engine API.
"""

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # lazy: importing the package (e.g. for the serving layer's config) must not load torch
    if name == "LLM":
        from qwen35_ray.llm import LLM

        return LLM
    if name == "SamplingParams":
        from qwen35_ray.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
