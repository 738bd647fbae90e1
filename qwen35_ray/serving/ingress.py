"""OpenAIIngress: the HTTP front (FastAPI on Starlette) of the collocated app.

It validates bodies, applies the chat template, tokenizes, streams SSE, and turns every user
mistake into an OpenAI error object with its status. Generation happens in LLMServer replicas,
reached through a Serve handle.
"""

import asyncio
import json
import logging
import time
import uuid

import pydantic
import transformers
from fastapi import FastAPI, Request
from ray import serve
from starlette.responses import PlainTextResponse

from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.generation_config import GenerationDefaults
from qwen35_ray.model.source import resolve_model
from qwen35_ray.serving.chat import (
    ChoiceParser,
    chat_logprobs,
    chat_response,
    chunk,
    render_prompt,
)
from qwen35_ray.serving.config import AppConfig
from qwen35_ray.serving.disagg import Disaggregator
from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.metrics import render, replica_stats, samples
from qwen35_ray.serving.parsers import prompt_ends_in_reasoning
from qwen35_ray.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from qwen35_ray.serving.streams import collect, merge, primed, sse, usage
from qwen35_ray.serving.structured import chat_spec, response_format_spec

log = logging.getLogger("qwen35_ray.serving")
app = FastAPI(title="qwen35-ray", docs_url=None, redoc_url=None)


@app.exception_handler(OpenAIError)
async def _openai_error(_, exc: OpenAIError):
    return exc.response()


@app.exception_handler(Exception)
async def _fault(_, exc: Exception):
    log.exception("internal error")
    return OpenAIError("internal server error", status=500).response()


@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, llm, config: dict, prefill=None):
        """llm: the LLMServer pool (collocated) or the DecodeServer pool; prefill: the
        PrefillServer pool of the disaggregated app."""
        self.cfg = AppConfig.model_validate(config)
        self.llm = llm
        self.pd = None if prefill is None else Disaggregator(prefill, llm, self.cfg.disaggregation)
        path = resolve_model(self.cfg.model)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model_config = ModelConfig.from_hf(path)
        self.max_model_len = min(
            self.cfg.engine.max_model_len or 10**9, model_config.max_position_embeddings
        )
        self.defaults = GenerationDefaults.read(path).sampling
        self.created = int(time.time())

    def _check_key(self, request: Request) -> None:
        if self.cfg.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.cfg.api_key}":
            raise OpenAIError("invalid or missing API key (Authorization: Bearer ...)", 401)

    async def _body(self, request: Request, model_cls):
        self._check_key(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_request_bytes:
            raise OpenAIError(f"request body over {self.cfg.max_request_bytes} bytes", 413)
        raw = await request.body()
        if len(raw) > self.cfg.max_request_bytes:
            raise OpenAIError(f"request body over {self.cfg.max_request_bytes} bytes", 413)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenAIError(f"the body is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise OpenAIError("the body must be a JSON object")
        try:
            req = model_cls.model_validate(data)
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or None
            raise OpenAIError(
                f"{where}: {first['msg']}" if where else first["msg"], param=where
            ) from e
        model = getattr(req, "model", None)
        if model is not None and model != self.cfg.model_name:
            raise OpenAIError(
                f"model {model!r} does not exist; this server serves {self.cfg.model_name!r}",
                status=404,
                param="model",
            )
        return req

    def _max_tokens(self, given: int | None, prompt_len: int) -> int:
        if prompt_len >= self.max_model_len:
            raise OpenAIError(
                f"the prompt has {prompt_len} tokens; the context of this model "
                f"is {self.max_model_len}; shorten the prompt",
                param="messages",
            )
        room = self.max_model_len - prompt_len
        if given is not None and given > room:
            raise OpenAIError(
                f"max_tokens={given} with a {prompt_len}-token prompt exceeds the "
                f"{self.max_model_len}-token context; lower max_tokens or shorten "
                "the prompt",
                param="max_tokens",
            )
        return given or room

    def _stream(self, prompt_ids: list[int], params: dict):
        if self.pd is not None:
            return self.pd.generate(prompt_ids, params)
        return self.llm.options(stream=True).generate.remote(prompt_ids, params)

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._check_key(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": self.cfg.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "qwen35-ray",
                    "max_model_len": self.max_model_len,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics(self):
        if self.pd is None:
            found = samples(await self.llm.stats.remote())
        else:
            found = samples({**self.pd.counters, "prefills_in_flight": self.pd.prefills_in_flight})
            for replica, n in self.pd.decode_replicas.items():
                found += samples({"decode_replica_requests_total": n}, {"replica": replica})
            for pool in ("PrefillServer", "DecodeServer"):
                for stats in await replica_stats(pool):
                    found += samples(stats, {"pool": pool, "replica": stats.pop("replica")})
        return PlainTextResponse(render(found), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        req = await self._body(request, TokenizeRequest)
        if req.messages is not None:
            chat = ChatCompletionRequest(model=self.cfg.model_name, messages=req.messages)
            text = render_prompt(self.tokenizer, chat)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        req = await self._body(request, DetokenizeRequest)
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in req.tokens):
            raise OpenAIError(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req = await self._body(request, ChatCompletionRequest)
        prompt = render_prompt(self.tokenizer, req)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        top = req.top_logprobs or 0
        params = req.sampling(
            self._max_tokens(req.max_new_tokens, len(ids)),
            top if req.logprobs else None,
            self.defaults,
        )
        params["structured"] = chat_spec(req, prompt_ends_in_reasoning(prompt))
        parsers = [ChoiceParser(prompt, req) for _ in range(req.n)]
        stream = self._stream(ids, params)
        if req.stream:
            stream = await primed(stream)
            return sse(self._chat_chunks(stream, req, parsers, len(ids)))
        texts, tokens, lps, reasons = await collect(stream, req.n)
        choices = []
        for i, p in enumerate(parsers):
            message = p.whole(texts[i])
            choice = {
                "index": i,
                "message": message,
                "finish_reason": "tool_calls" if p.num_calls else reasons[i],
                "logprobs": chat_logprobs(self.tokenizer, tokens[i], lps[i], top)
                if req.logprobs
                else None,
            }
            choices.append(choice)
        return chat_response(self.cfg.model_name, choices, usage(len(ids), sum(map(len, tokens))))

    async def _chat_chunks(self, stream, req, parsers, prompt_len):
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.cfg.model_name
        counts = [0] * req.n
        yield chunk(
            rid,
            model,
            created,
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(req.n)
            ],
        )
        async for step in stream:
            for d in step["outputs"]:
                i, final = d["index"], d["finish_reason"] is not None
                counts[i] += len(d["token_ids"])
                deltas = parsers[i].delta(d["text"], final=final)
                logprobs = (
                    chat_logprobs(
                        self.tokenizer, d["token_ids"], d["logprobs"], req.top_logprobs or 0
                    )
                    if req.logprobs
                    else None
                )
                for j, delta in enumerate(deltas):
                    yield chunk(
                        rid,
                        model,
                        created,
                        [
                            {
                                "index": i,
                                "delta": delta,
                                "finish_reason": None,
                                "logprobs": logprobs if j == 0 else None,
                            }
                        ],
                    )
                if not deltas and logprobs and logprobs["content"]:
                    yield chunk(
                        rid,
                        model,
                        created,
                        [{"index": i, "delta": {}, "logprobs": logprobs, "finish_reason": None}],
                    )
                if final:
                    reason = "tool_calls" if parsers[i].num_calls else d["finish_reason"]
                    yield chunk(
                        rid,
                        model,
                        created,
                        [{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}],
                    )
        if req.stream_options and req.stream_options.include_usage:
            yield chunk(rid, model, created, [], usage=usage(prompt_len, sum(counts)))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        req = await self._body(request, CompletionRequest)
        prompts = []
        for p in req.prompts():
            ids = self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
            if not ids:
                raise OpenAIError("prompt is empty", param="prompt")
            if any(not isinstance(t, int) or t < 0 for t in ids):
                raise OpenAIError("token ids must be non-negative integers", param="prompt")
            prompts.append(ids)
        streams = []
        for ids in prompts:
            params = req.sampling(
                self._max_tokens(req.max_tokens, len(ids)), req.logprobs, self.defaults
            )
            params["structured"] = response_format_spec(req.response_format)
            streams.append(self._stream(ids, params))
        if req.stream:
            streams = [await primed(s) for s in streams]
            return sse(self._completion_chunks(streams, req, prompts))
        results = await asyncio.gather(*(collect(s, req.n) for s in streams))
        choices, counts = [], []
        for k, (texts, tokens, lps, reasons) in enumerate(results):
            for i in range(req.n):
                choices.append(
                    {
                        "index": k * req.n + i,
                        "text": texts[i],
                        "finish_reason": reasons[i],
                        "logprobs": self._completion_logprobs(tokens[i], lps[i])
                        if req.logprobs is not None
                        else None,
                    }
                )
                counts.append(len(tokens[i]))
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.cfg.model_name,
            "choices": choices,
            "usage": usage(sum(map(len, prompts)), sum(counts)),
        }

    async def _completion_chunks(self, streams, req, prompts):
        rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.cfg.model_name
        counts = [0] * (len(streams) * req.n)
        async for k, step in merge(streams):
            for d in step["outputs"]:
                i = k * req.n + d["index"]
                counts[i] += len(d["token_ids"])
                yield {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": i,
                            "text": d["text"],
                            "finish_reason": d["finish_reason"],
                            "logprobs": self._completion_logprobs(d["token_ids"], d["logprobs"])
                            if req.logprobs is not None
                            else None,
                        }
                    ],
                }
        if req.stream_options and req.stream_options.include_usage:
            yield {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage(sum(map(len, prompts)), sum(counts)),
            }

    def _completion_logprobs(self, token_ids, logprobs):
        tokens = [self.tokenizer.decode([t]) for t in token_ids]
        return {
            "tokens": tokens,
            "token_logprobs": [lp[t] for t, lp in zip(token_ids, logprobs)],
            "top_logprobs": [
                {self.tokenizer.decode([k]): v for k, v in lp.items()} for lp in logprobs
            ],
            "text_offset": [sum(map(len, tokens[:j])) for j in range(len(tokens))],
        }
