"""Request bodies of the OpenAI API (the fields this server honours), validated by pydantic.

Unknown fields are accepted and ignored, as OpenAI's own clients send newer fields freely.
A field given as null takes its default, as in OpenAI's API. Bounds come from limits.py,
rules that span a field's values from checks.py.
"""

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from qwen35_ray.serving import checks, limits
from qwen35_ray.serving.schema_limits import check_schema


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(Body):
    include_usage: bool = False


class FunctionDef(Body):
    name: str = Field(min_length=1)
    description: str | None = None
    # bounded (depth, size, counts) as the grammar compiler needs it, forced call or not
    parameters: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _bounded_schema(self):
        if self.parameters is not None:
            check_schema(self.parameters, f"tool {self.name!r} parameters")
        return self


class Tool(Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(Body):
    class _Name(Body):
        name: str

    type: Literal["function"] = "function"
    function: _Name


class JsonSchemaFormat(Body):
    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    description: str | None = None
    # `schema` would shadow a BaseModel attribute
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _bounded_schema(self):
        if isinstance(self.schema_, dict):
            check_schema(self.schema_, "response_format.json_schema.schema")
        return self


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (
            self.json_schema is None or self.json_schema.schema_ is None
        ):
            raise ValueError(
                "type json_schema needs json_schema.schema, the JSON schema of the output"
            )
        return self


TokenId = Annotated[int, Field(ge=0)]
Messages = Annotated[
    list[dict[str, Any]],
    Field(min_length=1, max_length=limits.MAX_MESSAGES),
    AfterValidator(checks.messages),
]
Tools = Annotated[list[Tool], Field(max_length=limits.MAX_TOOLS)]
TemplateKwargs = Annotated[dict[str, Any], AfterValidator(checks.template_kwargs)]
ChatTemplate = Annotated[str, AfterValidator(checks.chat_template)]


class SamplingFields(Body):
    """Fields shared by chat and completions; extra-body ones follow vLLM's names."""

    model: str
    n: int = Field(1, ge=1, le=limits.MAX_N)
    best_of: int | None = Field(None, ge=1, le=limits.MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(
        None, ge=limits.REPETITION_PENALTY_MIN, le=limits.REPETITION_PENALTY_MAX
    )
    seed: int | None = Field(None, ge=limits.SEED_MIN, le=limits.SEED_MAX)
    stop: Annotated[str | list[str] | None, AfterValidator(checks.stop_strings)] = None
    stop_token_ids: Annotated[
        list[TokenId] | None,
        Field(max_length=limits.MAX_STOP_TOKEN_IDS),
        AfterValidator(checks.token_ids),
    ] = None
    logit_bias: Annotated[dict[str, float] | None, AfterValidator(checks.logit_bias)] = None
    thinking_token_budget: int | None = Field(None, ge=0, le=limits.MAX_THINKING_TOKEN_BUDGET)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if best_of is not None and best_of != n:
            raise ValueError(
                f"best_of={best_of} is not supported: only best_of equal to n ({n}) or null; "
                "use n for several outputs"
            )
        return best_of

    def sampling(self, max_tokens: int | None, logprobs: int | None, defaults: dict) -> dict:
        names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        given = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        # only when given, so that an engine without the field still takes the rest
        extra = {
            k: getattr(self, k)
            for k in ("logit_bias", "thinking_token_budget")
            if getattr(self, k) is not None
        }
        return {
            **defaults,
            **given,
            **extra,
            "n": self.n,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "max_tokens": max_tokens,
            "stop": list(self.stop or []),
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
            "skip_special_tokens": self.skip_special_tokens,
        }


class ChatInput(Body):
    """What the chat template renders: shared by chat completions and /tokenize."""

    tools: Tools | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    # vLLM's extra-body field; refused unless the operator trusts request templates
    chat_template: ChatTemplate | None = None

    @model_validator(mode="after")
    def _one_template(self):
        if self.chat_template is not None and "chat_template" in (self.chat_template_kwargs or {}):
            raise ValueError("give chat_template once, not also in chat_template_kwargs")
        return self


class ChatCompletionRequest(SamplingFields, ChatInput):
    messages: Messages
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=limits.MAX_LOGPROBS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names function "
                    f"{self.tool_choice.function.name!r}, which is not in tools"
                )
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=limits.MAX_LOGPROBS)
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported; leave it false or null")
        return echo

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt, info: ValidationInfo):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt is empty")
        prompts = _split(prompt)
        if len(prompts) > limits.MAX_PROMPTS:
            raise ValueError(
                f"at most {limits.MAX_PROMPTS} prompts in one request, got {len(prompts)}; "
                "split them over several requests"
            )
        for k, p in enumerate(prompts):
            if isinstance(p, list):
                checks.check_token_ids(p, info, f"prompt[{k}]" if len(prompts) > 1 else "")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        return _split(self.prompt)


def _split(p: str | list) -> list[str | list[int]]:
    if isinstance(p, str):
        return [p]
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


class TokenizeRequest(ChatInput):
    model: str | None = None
    prompt: str | None = None
    messages: Messages | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: Annotated[list[TokenId], AfterValidator(checks.token_ids)]
