"""OpenAIIngress: the HTTP front (FastAPI on Starlette) of the collocated app.

It validates bodies, applies the chat template, tokenizes, streams SSE, and turns every user
mistake into an OpenAI error object with its status. Generation happens in LLMServer replicas,
reached through a Serve handle.
"""

import asyncio
import hmac
import logging
import random
import time
import uuid
from collections import Counter

import transformers
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.exceptions import HTTPException
from starlette.responses import Response

from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.generation_config import GenerationDefaults
from qwen35_ray.model.image_processor import ImageProcessorConfig, image_grid, image_tokens
from qwen35_ray.model.source import resolve_model
from qwen35_ray.serving.autoscaling import autoscaling_samples
from qwen35_ray.serving.chat import (
    ChoiceParser,
    chat_logprobs,
    chat_response,
    chunk,
    render_prompt,
)
from qwen35_ray.serving.completions import (
    completion_chunks,
    completion_prompts,
    completion_response,
)
from qwen35_ray.serving.config import AppConfig
from qwen35_ray.serving.disagg import Disaggregator
from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.fanout import collect_all, start_all
from qwen35_ray.serving.media import image_parts, load_images
from qwen35_ray.serving.metrics import app_families, exposition, install, replica_names
from qwen35_ray.serving.openapi import request_body
from qwen35_ray.serving.parsers import prompt_ends_in_reasoning
from qwen35_ray.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from qwen35_ray.serving.request_body import parse_object, read_capped, validate
from qwen35_ray.serving.request_log import IngressMetrics, RequestLog, RequestLogMiddleware, tap
from qwen35_ray.serving.responses import create_response
from qwen35_ray.serving.responses_protocol import ResponsesRequest
from qwen35_ray.serving.serve_mode import by_reference, heavy, warn_if_slow_serve
from qwen35_ray.serving.streams import Migration, guarded, sse, usage
from qwen35_ray.serving.structured import chat_spec, response_format_spec

log = logging.getLogger("qwen35_ray.serving")
app = FastAPI(title="qwen35-ray", docs_url=None, redoc_url=None)
# one log line and the HTTP metrics per request (app.state.request_log, set by the ingress)
app.add_middleware(RequestLogMiddleware)


@app.exception_handler(OpenAIError)
async def _openai_error(_, exc: OpenAIError):
    return exc.response()


@app.exception_handler(HTTPException)
async def _http_error(_, exc: HTTPException):
    """Starlette's own answers (404 unknown route, 405 wrong method) as OpenAI errors."""
    return OpenAIError(str(exc.detail), status=exc.status_code, headers=exc.headers).response()


@app.exception_handler(RequestValidationError)
async def _validation_error(_, exc: RequestValidationError):
    # routes validate their own bodies; this covers any FastAPI-level parameter
    return OpenAIError(f"invalid request: {exc.errors()[0].get('msg')}").response()


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
        warn_if_slow_serve()
        self.llm = llm
        self.pd = None
        if prefill is not None:
            self.pd = Disaggregator(prefill, llm, self.cfg.disaggregation, self.cfg.migration_limit)
        # the collocated app's streams (the disaggregated app's are the Disaggregator's)
        self.counters = Counter({"migrations_total": 0, "migration_failures_total": 0})
        # the tokenizer, template and config: a hub model's weights stay on the hub
        path = resolve_model(self.cfg.model, weights=False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model_config = ModelConfig.from_hf(path)
        self.context = {
            "vocab_size": model_config.vocab_size,
            "trust_request_chat_template": self.cfg.trust_request_chat_template,
        }
        key = self.cfg.resolve_api_key()
        self.authorization = None if key is None else f"Bearer {key}".encode()
        self.max_model_len = min(
            model_config.context_len,
            self.cfg.max_model_len(disaggregated=prefill is not None) or 10**9,
        )
        self.defaults = GenerationDefaults.read(path).sampling
        # a checkpoint with a vision tower takes images: its <|image_pad|> token, and the
        # processor's geometry, which says how many tokens each image takes in the prompt
        self.image_token_id = model_config.image_token_id
        self.image_processor = (
            None if self.image_token_id is None else ImageProcessorConfig.from_pretrained(path)
        )
        self.media_limits = self.cfg.media.limits()
        self.created = int(time.time())
        pool, replica = replica_names("OpenAIIngress")
        self.metrics = IngressMetrics(pool, replica, self.cfg.model_name, self._counter_samples)
        app.state.request_log = RequestLog(
            self.metrics, self.cfg.log_requests, self.cfg.log_prompts, self.tokenizer.decode
        )
        install(self.metrics)

    def _counter_samples(self) -> list[tuple[str, dict, float]]:
        """This ingress's counters for /metrics: its streams' (or the Disaggregator's)."""
        if self.pd is None:
            return [(f"qwen35_ray_{k}", {}, v) for k, v in self.counters.items()]
        out = [(f"qwen35_ray_{k}", {}, v) for k, v in self.pd.counters.items()]
        out.append(("qwen35_ray_prefills_in_flight", {}, self.pd.prefills_in_flight))
        out += [
            ("qwen35_ray_decode_replica_requests_total", {"decode_replica": replica}, n)
            for replica, n in self.pd.decode_replicas.items()
        ]
        return out

    def _check_key(self, request: Request) -> None:
        if self.authorization is None:
            return
        # Starlette decodes headers as latin-1, so this gives back the bytes sent
        given = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, self.authorization):
            raise OpenAIError("invalid or missing API key (Authorization: Bearer ...)", 401)

    async def _body(self, request: Request, model_cls):
        self._check_key(request)
        raw = await read_capped(request, self.cfg.max_request_bytes)
        data = await asyncio.to_thread(parse_object, raw)
        req = validate(model_cls, data, self.context)
        model = getattr(req, "model", None)
        if model is not None and model != self.cfg.model_name:
            raise OpenAIError(
                f"model {model!r} does not exist; this server serves {self.cfg.model_name!r}",
                status=404,
                param="model",
            )
        return req

    async def _off_loop(self, fn, *args):
        """fn(*args) in a worker thread, within render_timeout_s: templates and tokenizers
        are CPU work a request controls, which must not hold the event loop."""
        budget = self.cfg.render_timeout_s
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), budget)
        except TimeoutError:
            raise OpenAIError(
                f"the prompt took more than render_timeout_s={budget:g} s to render and "
                "tokenize; shorten it (or raise render_timeout_s in the app config)"
            ) from None

    def _chat_prompt(self, req, add_generation_prompt: bool = True) -> tuple[str, list[int]]:
        prompt = render_prompt(self.tokenizer, req, add_generation_prompt)
        return prompt, self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    async def _chat_input(self, req, add_generation_prompt: bool = True):
        """(prompt text, prompt token ids, images) of a chat request. Each image's one
        <|image_pad|> from the template becomes its full run of pad tokens, so the ids are
        the prompt the engine computes: its length is what max_tokens, the context check and
        usage count. Images are read (base64, fetch, decode, hash) in a worker thread."""
        found = image_parts(req.messages)
        images = []
        if found:
            if self.image_token_id is None:
                raise OpenAIError(
                    f"model {self.cfg.model_name!r} takes no images (its checkpoint has no "
                    "vision tower); send text parts only",
                    param=found[0][0],
                )
            loaded = await asyncio.to_thread(load_images, req.messages, self.media_limits)
            images = [li.image for li in loaded]
        prompt, ids = await self._off_loop(self._chat_prompt, req, add_generation_prompt)
        if images:
            ids = self._expand_images(ids, images)
        return prompt, ids, images

    def _expand_images(self, ids: list[int], images: list) -> list[int]:
        pad = self.image_token_id
        if ids.count(pad) != len(images):
            raise OpenAIError(
                f"the rendered prompt has {ids.count(pad)} image placeholders for {len(images)} "
                "images (a system message cannot hold images; a custom chat template must "
                "write one <|vision_start|><|image_pad|><|vision_end|> per image)",
                param="messages",
            )
        sizes = iter(images)
        out = []
        for t in ids:
            if t != pad:
                out.append(t)
                continue
            image = next(sizes)
            grid = image_grid(image.height, image.width, self.image_processor)
            out.extend([pad] * image_tokens(grid, self.image_processor))
        return out

    def _params(self, req, max_tokens: int, logprobs: int | None, structured) -> dict:
        """The params dict for the LLM servers, checked here so that a request with several
        prompts is refused before any of them starts."""
        params = req.sampling(max_tokens, logprobs, self.defaults)
        if params["seed"] is None:
            # a stream migrated to another replica must draw what this one would have: the
            # engine's draw for each token depends on the seed and position alone
            params["seed"] = random.getrandbits(63)
        try:
            params["structured"] = structured()
        except OpenAIError:
            raise
        # a schema the grammar builder cannot read is the request's fault
        except (ValueError, TypeError, KeyError, RecursionError) as e:
            param = "tools" if getattr(req, "tools", None) else "response_format"
            raise OpenAIError(f"{param}: the schema cannot be used: {e}", param=param) from None
        try:
            SamplingParams(**params)
        except (TypeError, ValueError) as e:
            raise OpenAIError(str(e)) from None
        return params

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

    def _stream(self, prompt_ids: list[int], params: dict, images: list | None = None):
        """The replica stream of one prompt (images: PIL images, one per image of the
        prompt, in order), counted in the request's log line."""
        return tap(self._replica_stream(prompt_ids, params, images or None), prompt_ids)

    def _replica_stream(self, prompt_ids: list[int], params: dict, images: list | None):
        if self.pd is not None:
            return self.pd.generate(prompt_ids, params, images)
        llm = by_reference(self.llm, heavy(prompt_ids, params, images)).options(stream=True)
        migration = None
        if params.get("n", 1) == 1:
            resume = lambda r: llm.generate.remote(prompt_ids, params, None, r, images)  # noqa: E731
            migration = Migration(resume, self.cfg.migration_limit)
        return guarded(
            lambda: llm.generate.remote(prompt_ids, params, None, None, images),
            retries=self.cfg.disaggregation.retries,
            counters=self.counters,
            migration=migration,
        )

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
    async def metrics(self, request: Request):
        """Every replica of the app (serving/metrics.py), and the pools' autoscaling."""
        app_samples = [(f"qwen35_ray_{k}", la, v) for k, la, v in await autoscaling_samples()]
        found = await app_families(self.metrics, app_samples)
        body, content_type = exposition(found, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.post("/tokenize", openapi_extra=request_body(TokenizeRequest))
    async def tokenize(self, request: Request):
        req = await self._body(request, TokenizeRequest)
        if req.messages is not None:
            _, ids, _ = await self._chat_input(req, req.add_generation_prompt)
        else:
            ids = await self._off_loop(
                lambda: self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)
            )
            ids = ids["input_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    @app.post("/detokenize", openapi_extra=request_body(DetokenizeRequest))
    async def detokenize(self, request: Request):
        # token ids are checked against the vocabulary by the model (validation context)
        req = await self._body(request, DetokenizeRequest)
        return {"prompt": await self._off_loop(self.tokenizer.decode, req.tokens)}

    @app.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request):
        req = await self._body(request, ChatCompletionRequest)
        prompt, ids, images = await self._chat_input(req)
        top = req.top_logprobs or 0
        params = self._params(
            req,
            self._max_tokens(req.max_new_tokens, len(ids)),
            top if req.logprobs else None,
            lambda: chat_spec(req, prompt_ends_in_reasoning(prompt)),
        )
        parsers = [ChoiceParser(prompt, req) for _ in range(req.n)]
        stream = self._stream(ids, params, images)
        if req.stream:
            (stream,) = await start_all([stream])
            return sse(self._chat_chunks(stream, req, parsers, len(ids)))
        ((texts, tokens, lps, reasons),) = await collect_all([stream], req.n)
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

    @app.post("/v1/responses", openapi_extra=request_body(ResponsesRequest))
    async def responses(self, request: Request):
        # translated into a chat request and served by the same pipeline (serving/responses.py)
        return await create_response(self, await self._body(request, ResponsesRequest))

    @app.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
    async def completions(self, request: Request):
        req = await self._body(request, CompletionRequest)
        # every prompt tokenized and checked before any starts
        prompts = await self._off_loop(completion_prompts, self.tokenizer, req)
        spec = lambda: response_format_spec(req.response_format)  # noqa: E731
        params = [
            self._params(req, self._max_tokens(req.max_tokens, len(ids)), req.logprobs, spec)
            for ids in prompts
        ]
        streams = [self._stream(ids, p) for ids, p in zip(prompts, params)]
        if req.stream:
            streams = await start_all(streams)
            chunks = completion_chunks(self.tokenizer, self.cfg.model_name, req, prompts, streams)
            return sse(chunks)
        results = await collect_all(streams, req.n)
        return completion_response(self.tokenizer, self.cfg.model_name, req, prompts, results)
