"""LLM: the offline API vLLM users know. `LLM(model=...).generate(prompts, params)`.

With expert_parallel_size=N > 1 the engine spans N Ray rank actors (a local Ray cluster is
started when this process has none); shutdown(), or leaving a `with LLM(...)` block, ends them.
"""

import itertools

from tqdm import tqdm

from qwen35_ray.distributed.build import build_engine
from qwen35_ray.distributed.config import EPConfig
from qwen35_ray.engine.outputs import RequestOutput
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.llm_chat import chat_images

# text, or {"prompt_token_ids": [...]} (or {"prompt": text}), either with
# "multi_modal_data": {"image": PIL image or a list of them}, one per <|image_pad|> in order
Prompt = str | dict


class LLM:
    def __init__(
        self,
        model: str = "qwen35-tiny",
        dtype: str = "auto",
        device: str = "cpu",
        expert_parallel_size: int = 1,
        rank_num_cpus: float = 1.0,
        rank_num_gpus: float = 0.0,
        placement_strategy: str = "STRICT_PACK",
        speculative: dict | str | None = None,
        speculative_config: dict | str | None = None,
        **engine_kwargs,
    ):
        """speculative: MTP speculative decoding, {"method": "mtp", "num_speculative_tokens":
        k} with k 1..4 (docs/mtp.md); speculative_config is vLLM's name for it. The rest of
        engine_kwargs are EngineConfig's."""
        if speculative is not None and speculative_config is not None:
            raise ValueError(
                "speculative and speculative_config are one setting (speculative_config is "
                "vLLM's name); give one of them"
            )
        ep = EPConfig(expert_parallel_size, rank_num_cpus, rank_num_gpus, placement_strategy)
        engine_kwargs["speculative"] = (
            speculative if speculative is not None else speculative_config
        )
        # an LLMEngine (expert_parallel_size 1) or a DPEngine over the rank actors
        self.engine = build_engine(model, dtype, device, ep, **engine_kwargs)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """End the rank actors of an expert-parallel engine (nothing to do at size 1)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The model's generation_config.json defaults (temperature, top_p, top_k...)."""
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One finished output per prompt, in order. A request that fails raises its error
        (errors.RequestError: it cannot run as given; RequestFailed: our fault), and the call's
        other requests are aborted."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params] * len(prompts)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        order = []
        try:
            for prompt, p in zip(prompts, params):
                text, ids = self._encode(prompt)
                rid = str(next(self._ids))
                images = _images(prompt)
                if images:
                    self.engine.add_request(rid, ids, p, prompt=text, images=images)
                else:
                    self.engine.add_request(rid, ids, p, prompt=text)
                order.append(rid)
            done = self._run(order, use_tqdm)
        except BaseException:
            # the call's other requests would otherwise run on, for nobody, in the next call
            for rid in order:
                self.engine.abort(rid)
            raise
        return [done[rid] for rid in order]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        add_generation_prompt: bool = True,
        allowed_media_domains: tuple[str, ...] = (),
    ) -> list[RequestOutput]:
        """generate() on OpenAI-format conversations (one, or a list of them), rendered by
        the checkpoint's chat template, as vLLM's LLM.chat. Content parts: text, and images
        as image_url data URIs or PIL images (llm_chat.py; URLs only from
        allowed_media_domains). The outputs hold the raw text: reasoning and tool calls are
        not parsed out (the server's routes do that)."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conversation in conversations:
            conversation, images = chat_images(conversation, allowed_media_domains)
            text = self.engine.tokenizer.apply_chat_template(
                conversation,
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **(chat_template_kwargs or {}),
            )
            ids = self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompt = {"prompt": text, "prompt_token_ids": ids}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, order: list[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), desc="Generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.error is not None:
                        raise out.error
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return done

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.engine.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self.engine.tokenizer(prompt["prompt"])["input_ids"]
        raise TypeError(
            "a prompt is a string, {'prompt': text} or {'prompt_token_ids': [...]}, with "
            "images as 'multi_modal_data': {'image': [...]}"
        )


def _images(prompt: Prompt) -> list:
    """The PIL images of a prompt's multi_modal_data, in order."""
    if not isinstance(prompt, dict) or not prompt.get("multi_modal_data"):
        return []
    data = prompt["multi_modal_data"]
    if unknown := sorted(set(data) - {"image"}):
        raise ValueError(f"multi_modal_data has {unknown[0]!r}; only 'image' is supported")
    images = data.get("image") or []
    return list(images) if isinstance(images, (list, tuple)) else [images]
