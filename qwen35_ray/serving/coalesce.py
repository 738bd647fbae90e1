"""Stream deltas coalesced: a replica sends its caller what a request gained over several engine
steps in one item, at most one item per `interval_s` once the first token is out.

Each item of a Serve stream is a Ray object the replica serializes and reports, the ingress
fetches, turns into an SSE chunk and hands to Serve's proxy, which writes it: about 1.5 ms of
CPU per item over the three processes on 2 cores, more than the engine spends per token at 16
concurrent requests (docs/bench/serving.md). Coalescing divides that by the tokens per item.
The first token and the last item (a finish) go at once, so time to first token and the end of
a stream are not delayed; a token waits at most interval_s.
"""

import asyncio
import time
from collections.abc import AsyncIterator

_END = object()


def has_tokens(item: dict) -> bool:
    return any(d["token_ids"] or d["text"] for d in item.get("outputs", ()))


def finishes(item: dict) -> bool:
    return any(d["finish_reason"] is not None for d in item.get("outputs", ()))


def merge(items: list[dict]) -> dict:
    """One item saying what `items` say in order: each output's text, tokens and logprobs
    joined, its last finish reason, the last num_cached_tokens; other keys from the first
    item that has them."""
    out = dict(items[0])
    outputs: dict[int, dict] = {}
    for item in items:
        for k, v in item.items():
            out.setdefault(k, v)
        if "num_cached_tokens" in item:
            out["num_cached_tokens"] = item["num_cached_tokens"]
        for d in item.get("outputs", ()):
            have = outputs.get(d["index"])
            if have is None:
                outputs[d["index"]] = {**d, "token_ids": list(d["token_ids"])}
                if d["logprobs"] is not None:
                    outputs[d["index"]]["logprobs"] = list(d["logprobs"])
                continue
            have["text"] += d["text"]
            have["token_ids"] += d["token_ids"]
            if d["logprobs"] is not None:
                have["logprobs"] = (have["logprobs"] or []) + d["logprobs"]
            have["finish_reason"] = d["finish_reason"] or have["finish_reason"]
    if "outputs" in out:
        out["outputs"] = list(outputs.values())
    return out


async def coalesced(items: AsyncIterator[dict], interval_s: float) -> AsyncIterator[dict]:
    """items (LLMServer deltas), merged so that after the first token at most one item goes
    per interval_s; 0: every item as it comes. Items arrive through a task that runs `items`,
    so waiting for the interval never cancels it mid-step; leaving early (client gone)
    cancels that task, and with it the engine's request."""
    if interval_s <= 0:
        async for item in items:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump():
        try:
            async for item in items:
                queue.put_nowait(item)
        except BaseException as e:  # raised again to the caller, in order
            queue.put_nowait(e)
            raise
        finally:
            queue.put_nowait(_END)

    task = asyncio.create_task(pump())
    # when the last token went (None: none yet, so the first goes at once)
    last_sent = None
    # the end or an error taken while holding items: it follows them
    after = None
    try:
        while True:
            item = after if after is not None else await queue.get()
            after = None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            held = [item]
            if last_sent is not None and not finishes(item):
                due = last_sent + interval_s
                while (wait := due - time.monotonic()) > 0:
                    try:
                        nxt = await asyncio.wait_for(queue.get(), wait)
                    except TimeoutError:
                        break
                    if nxt is _END or isinstance(nxt, BaseException):
                        after = nxt
                        break
                    held.append(nxt)
                    if finishes(nxt):
                        break
            merged = merge(held) if len(held) > 1 else item
            if has_tokens(merged):
                last_sent = time.monotonic()
            yield merged
    finally:
        if not task.done():
            task.cancel()
        # let the cancelled request's cleanup (the engine's abort) run now
        await asyncio.gather(task, return_exceptions=True)
