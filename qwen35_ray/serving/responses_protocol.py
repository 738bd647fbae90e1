"""The request body of POST /v1/responses (OpenAI's Responses API), validated by pydantic.

Fields that ask for something this server cannot do are refused here with a 400 naming the
field (the table is in serving/responses.py). Unknown fields are ignored, as on the chat
route; the vLLM extra-body sampling fields are kept (`model_extra`) and handed to the chat
pipeline, which validates them as it does for /v1/chat/completions.
"""

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from qwen35_ray.serving import limits
from qwen35_ray.serving.protocol import Body
from qwen35_ray.serving.schema_limits import check_schema

EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
INCLUDABLE = (
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
)
# OpenAI's own bounds on metadata
MAX_METADATA, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


class FunctionTool(Body):
    """Responses' flat function tool: name and parameters at the top, not under `function`."""

    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _bounded_schema(self):
        if self.parameters is not None:
            check_schema(self.parameters, f"function {self.name!r} parameters")
        return self


class FunctionChoice(Body):
    type: Literal["function"]
    name: str


class TextFormat(Body):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    # `schema` would shadow a BaseModel attribute
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema":
            if self.schema_ is None:
                raise ValueError("type json_schema needs schema, the JSON schema of the output")
            if isinstance(self.schema_, dict):
                check_schema(self.schema_, "text.format.schema")
        return self


class TextConfig(Body):
    format: TextFormat | None = None
    # a hint for OpenAI's models; accepted, without effect here
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(Body):
    effort: Literal[EFFORTS] | None = None
    # no summaries are written: reasoning comes back whole, as reasoning_text content
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


# fields whose every value asks for what this server cannot do, and what to do instead
REFUSED = {
    "previous_response_id": (
        "this server stores no responses (store is accepted but nothing is kept), so it "
        "cannot continue one; send the whole conversation in input, the previous "
        "response's output items included"
    ),
    "conversation": "conversations are not stored here; send the whole conversation in input",
    "prompt": "stored prompt templates are not supported; send instructions and input",
    "context_management": "context compaction is not supported; leave context_management out",
    "moderation": "moderation is not supported; leave moderation out",
}


class ResponsesRequest(Body):
    # extra fields are kept: the vLLM sampling extras among them go to the chat pipeline
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str
    input: str | Annotated[list[Any], Field(min_length=1, max_length=limits.MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=limits.MAX_LOGPROBS)
    tools: Annotated[list[FunctionTool], Field(max_length=limits.MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    # accepted and never honoured: nothing is stored, and responses say "store": false
    store: bool | None = None
    background: bool = False
    include: list[Literal[INCLUDABLE]] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    previous_response_id: Any = None
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None
    moderation: Any = None

    @field_validator(*REFUSED)
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        raise ValueError(REFUSED[info.field_name])

    @field_validator("tools", mode="before")
    @classmethod
    def _functions_only(cls, tools: Any) -> Any:
        for i, tool in enumerate(tools if isinstance(tools, list) else ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(
                    f"item {i} has type {_short(kind)}: only function tools are supported; "
                    "built-in tools (web_search, file_search, code_interpreter, mcp, ...) are not"
                )
        return tools

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice_only(cls, choice: Any) -> Any:
        if isinstance(choice, dict) and choice.get("type") != "function":
            raise ValueError(
                f"type {_short(choice.get('type'))} is not supported; use 'auto', 'none', "
                "'required' or {'type': 'function', 'name': ...}"
            )
        return choice

    @field_validator("tool_choice")
    @classmethod
    def _choice_in_tools(cls, choice, info: ValidationInfo):
        names = {t.name for t in info.data.get("tools") or ()}
        if isinstance(choice, FunctionChoice) and choice.name not in names:
            raise ValueError(f"names function {choice.name!r}, which is not in tools")
        if choice == "required" and not names:
            raise ValueError("'required' needs tools")
        return choice

    @field_validator("text")
    @classmethod
    def _format_or_forced_call(cls, text: TextConfig, info: ValidationInfo) -> TextConfig:
        choice = info.data.get("tool_choice")
        forcing = choice == "required" or isinstance(choice, FunctionChoice)
        if forcing and text.format is not None and text.format.type != "text":
            raise ValueError(
                "a JSON text.format cannot be combined with a tool_choice that forces a call; "
                "use tool_choice 'auto' or drop text.format"
            )
        return text

    @field_validator("top_logprobs")
    @classmethod
    def _no_logprobs(cls, top: int) -> int:
        if top:
            raise ValueError("logprobs are not supported on /v1/responses; use 0 or leave it out")
        return top

    @field_validator("include")
    @classmethod
    def _no_logprobs_include(cls, include: list[str]) -> list[str]:
        if "message.output_text.logprobs" in include:
            raise ValueError(
                "message.output_text.logprobs is not supported on /v1/responses; "
                "use /v1/chat/completions with logprobs"
            )
        return include

    @field_validator("background")
    @classmethod
    def _foreground(cls, background: bool) -> bool:
        if background:
            raise ValueError(
                "background responses need a stored response to poll, and nothing is stored "
                "here; leave background false"
            )
        return background

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, truncation: str) -> str:
        if truncation == "auto":
            raise ValueError(
                "'auto' (dropping the start of the conversation) is not supported; shorten the "
                "input, or use 'disabled'"
            )
        return truncation

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, metadata: dict[str, str]) -> dict[str, str]:
        if len(metadata) > MAX_METADATA:
            raise ValueError(f"at most {MAX_METADATA} entries, got {len(metadata)}")
        for key, value in metadata.items():
            if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
                raise ValueError(
                    f"keys have at most {MAX_METADATA_KEY} characters and values at most "
                    f"{MAX_METADATA_VALUE}"
                )
        return metadata

    def thinking(self) -> bool | None:
        """enable_thinking for the chat template from reasoning.effort: "none" turns thinking
        off, any other effort turns it on (the template has no levels); None: unsaid."""
        effort = self.reasoning.effort if self.reasoning else None
        return None if effort is None else effort != "none"


def _short(value: Any) -> str:
    return repr(value)[:40]
