"""Streams through a running app while its replicas are killed or stopped (the migration and
drain tests), and the uninterrupted offline run they must equal."""

import threading
import time

import openai
import ray
from http_helpers import client

from qwen35_ray import LLM


def replicas(app: str, deployment: str) -> set[str]:
    """Serve's replica actors of one deployment (named SERVE_REPLICA::<app>#<deployment>#<id>)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(prefix)
    }


def engine_stats(name: str) -> dict:
    """One replica's engine stats now (running, generation_tokens_total, ...), asked directly:
    the record_routing_stats Serve's controller polls."""
    return ray.get(ray.get_actor(name, namespace="serve").record_routing_stats.remote())


def kill(name: str) -> None:
    ray.kill(ray.get_actor(name, namespace="serve"))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"{what} did not happen in {timeout:g} s"
        time.sleep(0.1)


class Streams:
    """Completions (prompt ids, request kwargs) streamed in threads: the text, finish reason
    and (token, logprob) pairs of each, or the openai error that ended it; `progress` counts
    the events of each."""

    def __init__(self, base: str, model: str, requests: list[tuple[list[int], dict]]):
        self.progress = [0] * len(requests)
        self.results: list = [None] * len(requests)
        self.threads = [
            threading.Thread(target=self._run, args=(i, base, model, ids, kw), daemon=True)
            for i, (ids, kw) in enumerate(requests)
        ]
        for t in self.threads:
            t.start()

    def _run(self, i, base, model, ids, kw):
        text, reason, lps = "", None, []
        try:
            for ev in client(base, timeout=300).completions.create(
                model=model, prompt=ids, stream=True, **kw
            ):
                self.progress[i] += 1
                for ch in ev.choices:
                    text += ch.text
                    reason = ch.finish_reason or reason
                    if ch.logprobs is not None:
                        lps += list(zip(ch.logprobs.tokens, ch.logprobs.token_logprobs))
            self.results[i] = (text, reason, lps)
        except openai.APIError as e:
            self.results[i] = e

    def join(self, timeout: float = 300) -> list:
        deadline = time.time() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.time()))
        assert not any(t.is_alive() for t in self.threads), "a stream did not end"
        return self.results


def offline_run(model: str, engine: dict, requests: list[tuple[list[int], dict]]) -> list:
    """(text, finish reason, (token, logprob) pairs) of each request as Streams sends it, run
    uninterrupted by the offline engine in this process, with the ingress's sampling values:
    the checkpoint's defaults under the request's own."""
    llm = LLM(model, dtype="float32", **engine)
    tok = llm.get_tokenizer()
    params = []
    for _, kw in requests:
        extra = kw.get("extra_body", {})
        fmt = extra.get("response_format")
        structured = None
        if fmt is not None:
            structured = {"type": "json_schema", "schema": fmt["json_schema"]["schema"]}
        params.append(
            llm.engine.default_sampling_params(
                temperature=kw["temperature"],
                seed=kw["seed"],
                max_tokens=kw["max_tokens"],
                ignore_eos=extra.get("ignore_eos", False),
                logprobs=kw.get("logprobs"),
                structured=structured,
            )
        )
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in requests], params)
    result = []
    for out in outs:
        o = out.outputs[0]
        lps = [(tok.decode([t]), lp[t]) for t, lp in zip(o.token_ids, o.logprobs or [])]
        result.append((o.text, o.finish_reason, lps))
    return result
