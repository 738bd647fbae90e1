"""`bench serve --offline`: the same requests through the engine in this process, with the
engine settings of a Serve YAML's pool, at the same concurrency and arrival times, timed as the
HTTP client times them: TTFT to the first step output with a token, ITL between step outputs
that add tokens, latency to the last. The ratio of the two runs is what Ray Serve, HTTP, SSE and
the ingress cost.

Threads: the offline engine runs the torch threads the pool's replicas run (its torch_threads,
else what Ray gives an actor: its num_cpus rounded down, at least 1); --offline-threads sets
another number. The run records both.

Compiled decode: with compile_decode auto (the default) the engine compiles in the background;
the offline engine is waited for before any request (its start-up counts the wait), as
bench serve waits for the served replicas' (LLMServer.wait_compiled), so both run compiled.
"""

import itertools
import time
from pathlib import Path

from qwen35_ray.bench.serve_client import BenchRequest
from qwen35_ray.bench.serve_metrics import RequestRecord

# the longest wait for a compiled decode step (a cold compile takes about a minute on 2 cores,
# over 90 s with the host busy)
COMPILE_WAIT_S = 600


def application(path: Path, app: str | None) -> dict:
    """The application named app of a Serve YAML (None: its first)."""
    import yaml

    apps = (yaml.safe_load(Path(path).read_text()) or {}).get("applications") or []
    if not apps:
        raise SystemExit(f"bench serve: {path} has no applications")
    chosen = next((a for a in apps if a.get("name") == app), apps[0] if app is None else None)
    if chosen is None:
        names = ", ".join(str(a.get("name")) for a in apps)
        raise SystemExit(f"bench serve: --app {app!r} is not in {path}; its applications: {names}")
    return chosen


def app_name(path: Path, app: str | None) -> str:
    return application(path, app).get("name", "default")


class OfflineEngine:
    """One in-process LLMEngine behind an AsyncEngine (created in the running event loop)."""

    def __init__(self, yaml_path: Path, app: str | None, pool: str | None, threads: int | None):
        import torch

        from qwen35_ray.engine.llm_engine import LLMEngine
        from qwen35_ray.serving.config import AppConfig

        chosen = application(yaml_path, app)
        import_path = chosen.get("import_path", "")
        cfg = AppConfig.model_validate(chosen.get("args") or {})
        # the disaggregated app's engine settings closest to one whole engine: the decode pool's
        pool = pool or ("decode_server" if import_path.endswith("build_pd_app") else "llm_server")
        e = cfg.engine_for(pool)
        if e.expert_parallel_size > 1:
            raise SystemExit(
                f"bench serve --offline runs one in-process engine; pool {pool} of {yaml_path} "
                f"is expert-parallel (expert_parallel_size {e.expert_parallel_size})"
            )
        pool_cpus = getattr(cfg, pool).num_cpus
        self.threads = threads or getattr(cfg, pool).threads
        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        self.engine = LLMEngine.from_pretrained(
            cfg.model, dtype=cfg.dtype, device=cfg.device, **e.engine_kwargs
        )
        compiled = self.engine.executor.wait_compiled(COMPILE_WAIT_S)
        self.settings = {
            "config": str(yaml_path),
            "pool": pool,
            "model": cfg.model,
            "dtype": cfg.dtype,
            "device": cfg.device,
            "engine": e.engine_kwargs,
            "pool_num_cpus": pool_cpus,
            "pool_torch_threads": getattr(cfg, pool).torch_threads,
            "torch_threads": self.threads,
            "decode_compiled": compiled,
            "startup_s": time.perf_counter() - start,
        }
        self._async = None
        self._ids = itertools.count()

    def stats(self) -> dict:
        """The engine's counters (steps and their seconds), safe while it steps."""
        return self._async.stats() if self._async is not None else self.engine.load_stats()

    def prompt_ids(self, req: BenchRequest) -> list[int]:
        tok = self.engine.tokenizer
        if req.messages is not None:
            text = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            return tok(text)["input_ids"]
        if isinstance(req.prompt, str):
            return tok(req.prompt)["input_ids"]
        return list(req.prompt)

    async def send(self, req: BenchRequest, temperature: float | None, ignore_eos: bool):
        from qwen35_ray.engine.async_engine import AsyncEngine

        if self._async is None:
            self._async = AsyncEngine(self.engine)
        overrides = {"max_tokens": req.output_len, "ignore_eos": ignore_eos}
        if temperature is not None:
            overrides["temperature"] = temperature
        params = self.engine.default_sampling_params(**overrides)
        ids = self.prompt_ids(req)
        rec = RequestRecord(prompt_len=len(ids), output_tokens_source="engine")
        start = rec.start_time = time.perf_counter()
        last, tokens = None, 0
        try:
            async for out in self._async.generate(f"offline-{next(self._ids)}", ids, params):
                now = time.perf_counter()
                n = len(out.outputs[0].token_ids)
                if n > tokens:
                    if last is None:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last, tokens = now, n
                    rec.generated_text = out.outputs[0].text
        except Exception as e:  # counted as a failed request, as the HTTP client counts one
            rec.error = f"{type(e).__name__}: {e}"
            return rec
        if last is None:
            rec.error = "the engine gave no output"
            return rec
        rec.latency, rec.output_tokens, rec.success = last - start, tokens, True
        return rec
