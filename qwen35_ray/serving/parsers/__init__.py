"""Output parsers for the OpenAI API: reasoning_content and qwen3_coder XML tool calls."""

from qwen35_ray.serving.parsers.reasoning import ReasoningParser, prompt_ends_in_reasoning
from qwen35_ray.serving.parsers.tool_calls import ToolCallParser

__all__ = ["ReasoningParser", "ToolCallParser", "prompt_ends_in_reasoning"]
