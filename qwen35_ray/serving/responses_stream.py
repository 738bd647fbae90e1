"""A Responses API response built from the replica's steps: its output items, and the stream
events that build them, in the order OpenAI documents and the `openai` SDK's stream
accumulator checks (each event numbered by `sequence_number`, from 0):

    response.created, response.in_progress                    (status in_progress, no output)
    per reasoning item:  response.output_item.added, response.content_part.added (reasoning_text),
                         response.reasoning_text.delta..., response.reasoning_text.done,
                         response.content_part.done, response.output_item.done
    per message:         the same with output_text parts and response.output_text.delta / .done
    per function call:   response.output_item.added, response.function_call_arguments.delta,
                         response.function_call_arguments.done, response.output_item.done
    response.completed, or response.incomplete when max_output_tokens ran out (the item being
    written then has status incomplete); or, when the request fails midway, an `error` event
    and response.failed.

A non-streaming request runs the same builder and returns its final response object, so both
carry the same output. The text is split by the chat route's parsers (chat.ChoiceParser).
"""

import json
import logging
import time
import uuid

from starlette.responses import StreamingResponse

from qwen35_ray.serving.chat import ChoiceParser
from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.parsers import prompt_ends_in_reasoning
from qwen35_ray.serving.parsers.tags import THINK_END, THINK_START

log = logging.getLogger("qwen35_ray.serving")


class ResponseBuilder:
    def __init__(
        self, req, chat, prompt: str, prompt_len: int, params: dict, model: str, tokenizer
    ):
        """req: the ResponsesRequest; chat: its ChatCompletionRequest; params: the sampling
        params sent to the replicas (the effective temperature and top_p are echoed); model:
        the served model name."""
        self.req, self.params, self.prompt_len, self.model = req, params, prompt_len, model
        self.parser = ChoiceParser(prompt, chat)
        self.counter = ReasoningCounter(tokenizer, prompt_ends_in_reasoning(prompt))
        self.id, self.created = f"resp_{uuid.uuid4().hex}", int(time.time())
        self.seq = 0
        self.items: list[dict] = []
        # the reasoning item or message being written, with its text so far
        self.open: dict | None = None
        self.text = ""
        self.calls = self.output_tokens = 0
        self.cached_tokens: int | None = None
        self.finish_reason: str | None = None
        self.flushed = False
        self.status = "in_progress"
        self.error: dict | None = None

    def start(self) -> list[dict]:
        return [
            self._event("response.created", response=self.response()),
            self._event("response.in_progress", response=self.response()),
        ]

    def feed(self, step: dict) -> list[dict]:
        """Events for one replica step: {"outputs": [{text, token_ids, finish_reason, ...}]}."""
        if self.cached_tokens is None and "num_cached_tokens" in step:
            self.cached_tokens = min(int(step["num_cached_tokens"] or 0), self.prompt_len)
        events = []
        for d in step["outputs"]:
            self.output_tokens += len(d["token_ids"])
            self.counter.feed(d["token_ids"])
            final = d["finish_reason"] is not None
            self.finish_reason = d["finish_reason"] or self.finish_reason
            self.flushed = self.flushed or final
            for delta in self.parser.delta(d["text"], final=final):
                events += self._delta(delta)
        return events

    def finish(self) -> list[dict]:
        """The last events, once the replica's stream has ended."""
        events = []
        if not self.flushed:
            self.flushed = True
            for delta in self.parser.delta("", final=True):
                events += self._delta(delta)
        incomplete = self.finish_reason == "length"
        events += self._close("incomplete" if incomplete else "completed")
        self.status = "incomplete" if incomplete else "completed"
        kind = "response.incomplete" if incomplete else "response.completed"
        return events + [self._event(kind, response=self.response())]

    def fail(self, error: OpenAIError) -> list[dict]:
        """The last events of a stream whose request failed after it started."""
        events = self._close("incomplete")
        self.status = "failed"
        self.error = {"code": "server_error", "message": error.message}
        return events + [
            self._event("error", code=str(error.status), message=error.message, param=error.param),
            self._event("response.failed", response=self.response()),
        ]

    def response(self) -> dict:
        """The response object as it stands (output items finished so far)."""
        req = self.req
        done = self.status != "in_progress"
        fmt = req.text.format if req.text and req.text.format else None
        reasoning = req.reasoning
        choice = req.tool_choice
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": self.status,
            "completed_at": int(time.time()) if self.status == "completed" else None,
            "background": False,
            "error": self.error,
            "incomplete_details": {"reason": "max_output_tokens"}
            if self.status == "incomplete"
            else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {},
            "model": self.model,
            "output": [dict(item) for item in self.items if item is not self.open] if done else [],
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": {
                "effort": reasoning.effort if reasoning else None,
                "summary": reasoning.summary if reasoning else None,
            },
            "store": False,
            "temperature": self.params.get("temperature"),
            "text": {
                "format": fmt.model_dump(by_alias=True, exclude_none=True)
                if fmt
                else {"type": "text"}
            },
            "tool_choice": choice.model_dump()
            if hasattr(choice, "model_dump")
            else choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
            "top_logprobs": 0,
            "top_p": self.params.get("top_p"),
            "truncation": "disabled",
            "usage": self._usage() if done else None,
            "user": req.user,
        }

    def _usage(self) -> dict:
        return {
            "input_tokens": self.prompt_len,
            "input_tokens_details": {
                "cached_tokens": self.cached_tokens or 0,
                "cache_write_tokens": 0,
            },
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.counter.count},
            "total_tokens": self.prompt_len + self.output_tokens,
        }

    def _delta(self, delta: dict) -> list[dict]:
        """Events for one of ChoiceParser's deltas: reasoning, content or a whole tool call."""
        if "reasoning_content" in delta:
            events = self._ensure_open("reasoning")
            self.text += delta["reasoning_content"]
            return events + [
                self._part_event("response.reasoning_text.delta", delta=delta["reasoning_content"])
            ]
        if "content" in delta:
            events = self._ensure_open("message")
            self.text += delta["content"]
            return events + [
                self._part_event("response.output_text.delta", delta=delta["content"], logprobs=[])
            ]
        events = []
        for call in delta.get("tool_calls", ()):
            if self.calls and not self.req.parallel_tool_calls:
                continue
            self.calls += 1
            events += self._close("completed")
            events += self._function_call(call)
        return events

    def _function_call(self, call: dict) -> list[dict]:
        fn = call["function"]
        item = {
            "id": f"fc_{uuid.uuid4().hex}",
            "type": "function_call",
            "call_id": call["id"],
            "name": fn["name"],
            "arguments": "",
            "status": "in_progress",
        }
        index = len(self.items)
        self.items.append(item)
        where = {"item_id": item["id"], "output_index": index}
        added = self._event("response.output_item.added", output_index=index, item=dict(item))
        item.update(arguments=fn["arguments"], status="completed")
        return [
            added,
            self._event("response.function_call_arguments.delta", **where, delta=fn["arguments"]),
            self._event(
                "response.function_call_arguments.done", **where, arguments=fn["arguments"]
            ),
            self._event("response.output_item.done", output_index=index, item=dict(item)),
        ]

    def _ensure_open(self, kind: str) -> list[dict]:
        """Opens a reasoning item or a message (closing the other): its added events."""
        if self.open is not None and self.open["type"] == kind:
            return []
        events = self._close("completed")
        key = "rs" if kind == "reasoning" else "msg"
        item = {"id": f"{key}_{uuid.uuid4().hex}", "type": kind, "status": "in_progress"}
        if kind == "reasoning":
            item.update(summary=[], content=[])
        else:
            item.update(role="assistant", content=[])
        self.items.append(item)
        self.open, self.text = item, ""
        index = len(self.items) - 1
        return events + [
            self._event("response.output_item.added", output_index=index, item=dict(item)),
            self._part_event("response.content_part.added", part=self._part("")),
        ]

    def _close(self, status: str) -> list[dict]:
        """Closes the open reasoning item or message: its done events."""
        item = self.open
        if item is None:
            return []
        part = self._part(self.text)
        if item["type"] == "reasoning":
            done = self._part_event("response.reasoning_text.done", text=self.text)
        else:
            done = self._part_event("response.output_text.done", text=self.text, logprobs=[])
        events = [done, self._part_event("response.content_part.done", part=part)]
        item.update(content=[part], status=status)
        self.open = None
        index = self.items.index(item)
        return events + [self._event("response.output_item.done", output_index=index, item=item)]

    def _part(self, text: str) -> dict:
        if self.open["type"] == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _part_event(self, kind: str, **fields) -> dict:
        where = {"item_id": self.open["id"], "output_index": self.items.index(self.open)}
        return self._event(kind, **where, content_index=0, **fields)

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event


class ReasoningCounter:
    """Output tokens of reasoning: from the start of the output when the prompt leaves
    `<think>` open (else from a `<think>` the output opens with) up to its `</think>`."""

    def __init__(self, tokenizer, prompt_in_reasoning: bool):
        self.start, self.end = tokenizer.convert_tokens_to_ids([THINK_START, THINK_END])
        self.inside, self.seen, self.count = prompt_in_reasoning, False, 0

    def feed(self, token_ids: list[int]) -> None:
        for t in token_ids:
            if not self.seen and not self.inside and t == self.start:
                self.inside = True
            self.seen = True
            if self.inside:
                self.count += 1
                self.inside = t != self.end


def event_stream(builder: ResponseBuilder, stream) -> StreamingResponse:
    """SSE of a response's events (`event:` names its type) from the replica's stream."""

    async def events():
        yield builder.start()
        try:
            async for step in stream:
                yield builder.feed(step)
        except OpenAIError as e:
            yield builder.fail(e)
            return
        except Exception:
            log.exception("response stream failed")
            yield builder.fail(OpenAIError("internal server error", 500))
            return
        yield builder.finish()

    async def body():
        async for batch in events():
            for event in batch:
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")
