"""What /metrics exports: the HELP text of every family, the histograms' bucket edges, and
samples (name, labels, value) turned into prometheus_client families.

Names: a metric vLLM also has keeps vLLM's name with `qwen35_ray:` for `vllm:`
(`qwen35_ray:time_to_first_token_seconds`), so a vLLM dashboard works after that one
substitution; the project's own are `qwen35_ray_<name>`. Prometheus reserves colons for
recording rules, and vLLM uses them anyway; the colon marks a vLLM twin here
(docs/metrics.md).
"""

from prometheus_client import disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# no <name>_created series beside every counter and histogram (vLLM turns them off too)
disable_created_metrics()

# vLLM's edges (vllm/v1/metrics/loggers.py), extended below 10 ms for ITL and below 0.3 s for
# request times: a GPU decodes a step in a few ms, and a short request of a small model, or the
# queue time of an idle server, would otherwise all land in the first bucket
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0]
VLLM_TTFT += [7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5]
VLLM_ITL += [10.0, 20.0, 40.0, 80.0]
VLLM_REQUEST = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0]
VLLM_REQUEST += [60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
BUCKETS = {
    "ttft": VLLM_TTFT,
    "itl": [0.001, 0.0025, 0.005, 0.0075, *VLLM_ITL],
    "request": [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, *VLLM_REQUEST],
}


def token_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to the context (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return out
            out.append(m * scale)
        scale *= 10


HELP = {
    # vLLM's, engine replicas
    "qwen35_ray:time_to_first_token_seconds": "Time from the replica receiving a request to "
    "its first token (prefill replica or collocated).",
    "qwen35_ray:inter_token_latency_seconds": "Time between a request's successive engine "
    "steps that gave it tokens.",
    "qwen35_ray:e2e_request_latency_seconds": "Time from the replica receiving a request to "
    "its end (stop or length).",
    "qwen35_ray:request_queue_time_seconds": "Time a request waited in the engine before its "
    "first scheduled step.",
    "qwen35_ray:request_prefill_time_seconds": "Time from a request's first scheduled step to "
    "its first token.",
    "qwen35_ray:request_decode_time_seconds": "Time from a request's first token to its end.",
    "qwen35_ray:request_prompt_tokens": "Prompt tokens of each request prefilled here.",
    "qwen35_ray:request_generation_tokens": "Tokens generated per completed request, all its "
    "outputs (n) together.",
    "qwen35_ray:prompt_tokens": "Prompt tokens of the requests prefilled here, cached ones "
    "included.",
    "qwen35_ray:generation_tokens": "Tokens generated and streamed by this replica.",
    "qwen35_ray:request_success": "Requests that ended on this replica, by finish reason "
    "(stop, length, abort: the client left, error).",
    "qwen35_ray:num_requests_running": "Requests in the engine's running batch.",
    "qwen35_ray:num_requests_waiting": "Requests waiting to be scheduled.",
    "qwen35_ray:num_preemptions": "Sequences preempted (freed, to be recomputed).",
    "qwen35_ray:prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
    "qwen35_ray:prefix_cache_hits": "Prompt tokens found in the prefix cache.",
    "qwen35_ray:kv_cache_usage_perc": "Fraction of KV blocks in use (1 = full).",
    "qwen35_ray:spec_decode_num_drafts": "Verify rows that could keep drafts (speculative "
    "decoding).",
    "qwen35_ray:spec_decode_num_draft_tokens": "Draft tokens those rows verified.",
    "qwen35_ray:spec_decode_num_accepted_tokens": "Draft tokens kept.",
    "qwen35_ray:spec_decode_num_accepted_tokens_per_pos": "Draft tokens kept at each draft "
    "position (position 0: the first draft).",
    # the project's own, engine replicas
    "qwen35_ray_state_slot_usage_perc": "Fraction of GDN state slots in use (1 = full).",
    "qwen35_ray_pending_prompt_tokens": "Prompt tokens not yet computed, running prompts' rest "
    "included.",
    "qwen35_ray_state_slots_total": "GDN state slots.",
    "qwen35_ray_state_slots_free": "Free GDN state slots.",
    "qwen35_ray_kv_blocks_total": "KV blocks.",
    "qwen35_ray_kv_blocks_free": "Free KV blocks (cached ones nobody holds included).",
    "qwen35_ray_prompt_tokens_computed": "Prompt tokens the model computed (prefix-cache hits "
    "excluded, recomputations included).",
    "qwen35_ray_steps": "Engine steps.",
    "qwen35_ray_step_seconds": "Time spent in engine steps.",
    "qwen35_ray_decode_steps": "Engine steps in which a sequence decoded.",
    "qwen35_ray_decode_step_seconds": "Time spent in engine steps in which a sequence decoded.",
    "qwen35_ray_step_cpu_seconds": "CPU time of the stepping thread in engine steps (the rest "
    "of qwen35_ray_step_seconds it waited: for a CPU, the GIL, the device or the ranks).",
    "qwen35_ray_images_preprocessed": "Images prepared at admission (pixels, pad tokens, "
    "positions).",
    "qwen35_ray_image_preprocess_seconds": "Time spent preparing images at admission.",
    "qwen35_ray_encoder_images": "Images the vision tower encoded (encoder cache misses).",
    "qwen35_ray_encoder_seconds": "Time spent in the vision tower (host wall time).",
    "qwen35_ray_encoder_cache_hits": "Images whose vision tower output the encoder cache held.",
    "qwen35_ray_requests": "Requests this replica started (resumed ones included).",
    "qwen35_ray_requests_aborted": "Requests cut off before their end (client gone).",
    "qwen35_ray_requests_rejected": "Requests refused with 503 (queue full).",
    "qwen35_ray_requests_failed": "Requests failed by the server (500).",
    "qwen35_ray_requests_resumed": "Streams resumed here after their replica was lost.",
    "qwen35_ray_transfer_bytes": "Bytes of request states handed from prefill to decode "
    "(the state size formula).",
    "qwen35_ray_transfer_send_seconds": "Time the prefill replica spent publishing states.",
    "qwen35_ray_imports": "Request states imported by a decode replica.",
    "qwen35_ray_transfer_receive_seconds": "Time decode replicas spent fetching states.",
    # expert parallelism (serving/metrics_ep.py)
    "qwen35_ray_expert_parallel_size": "Ranks of the replica's expert-parallel group.",
    "qwen35_ray_expert_bytes_resident": "Expert weight bytes a rank holds.",
    "qwen35_ray_expert_bytes_total": "Expert weight bytes of the whole model.",
    "qwen35_ray_all_to_all_bytes": "Bytes a rank sent in all-to-alls.",
    "qwen35_ray_all_to_all_seconds": "Time a rank spent in all-to-alls.",
    "qwen35_ray_expert_load_window_steps": "Steps in the expert-load window.",
    "qwen35_ray_expert_load_max_over_mean": "Tokens of a layer's busiest expert over the mean.",
    "qwen35_ray_rank_load_max_over_mean": "Tokens of a layer's busiest rank over the mean.",
    "qwen35_ray_expert_tokens": "Tokens routed to each expert over the window.",
    # ingress replicas
    "qwen35_ray_http_requests": "HTTP requests by route, method and status (499: the client "
    "left before the response started).",
    "qwen35_ray_http_request_duration_seconds": "Time from the ingress receiving a request to "
    "its response's end.",
    "qwen35_ray_http_time_to_first_token_seconds": "Time from the ingress receiving a request to "
    "its first token reaching the ingress.",
    "qwen35_ray_migrations": "Streams resumed on another replica after theirs was lost.",
    "qwen35_ray_migration_failures": "Streams that ran out of migration_limit.",
    "qwen35_ray_replica_failures": "Engine replicas lost under a request.",
    "qwen35_ray_retries": "Requests retried on another replica before any output.",
    "qwen35_ray_decode_replica_failures": "Decode replicas lost under a request.",
    "qwen35_ray_decode_retries": "Requests retried on another decode replica.",
    "qwen35_ray_prefill_replica_failures": "Prefill replicas lost under a request.",
    "qwen35_ray_requests_local_prefill": "Requests prefilled on the decode pool.",
    "qwen35_ray_requests_disaggregated": "Requests prefilled on the prefill pool.",
    "qwen35_ray_prefill_seconds": "Time the ingress waited for prefills.",
    "qwen35_ray_transfers": "Request states handed from prefill to decode.",
    "qwen35_ray_transfer_wire_bytes": "Bytes that crossed the wire for those states.",
    "qwen35_ray_transfer_seconds": "Time spent sending and fetching states.",
    "qwen35_ray_prefills_in_flight": "Prefills the ingress waits for.",
    "qwen35_ray_decode_replica_requests": "Requests each decode replica (decode_replica) "
    "served for this ingress.",
    # the app (serving/metrics.py, serving/autoscaling.py)
    "qwen35_ray_replica_scraped": "1 if the replica answered this scrape, 0 if not.",
    "qwen35_ray_serve_replicas": "Replicas per pool and state (serve.status()).",
    "qwen35_ray_autoscaling_target_replicas": "The pool's target after the last decision.",
    "qwen35_ray_autoscaling_desired_replicas": "Replicas the policy's signals ask for.",
    "qwen35_ray_autoscaling_decision": "The last decision's direction and reason (value 1).",
    "qwen35_ray_autoscaling_pressure": "The pool's load against its targets (1 = at target).",
    "qwen35_ray_autoscaling_scale_ups": "Scale-ups decided.",
    "qwen35_ray_autoscaling_scale_downs": "Scale-downs decided.",
}
# families named after a signal (serving/autoscaling.py): their HELP by prefix
HELP_PREFIXES = {
    "qwen35_ray_autoscaling_pool_": "A pool-level autoscaling signal of the last decision.",
    "qwen35_ray_autoscaling_": "A replica's autoscaling signal as its pool's policy saw it.",
}
# engine stats (LLMEngine.load_stats keys) that vLLM also has, under vLLM's names; the other
# numbers of load_stats are the project's own, qwen35_ray_<key>
VLLM_ENGINE_STATS = {
    "running": "qwen35_ray:num_requests_running",
    "waiting": "qwen35_ray:num_requests_waiting",
    "preemptions_total": "qwen35_ray:num_preemptions_total",
    "prefix_cache_queries_total": "qwen35_ray:prefix_cache_queries_total",
    "prefix_cache_hits_total": "qwen35_ray:prefix_cache_hits_total",
    # only while speculative decoding is on (engine/spec_stats.py)
    "spec_decode_num_drafts_total": "qwen35_ray:spec_decode_num_drafts_total",
    "spec_decode_num_draft_tokens_total": "qwen35_ray:spec_decode_num_draft_tokens_total",
    "spec_decode_num_accepted_tokens_total": "qwen35_ray:spec_decode_num_accepted_tokens_total",
    "spec_decode_num_accepted_tokens_per_pos": (
        "qwen35_ray:spec_decode_num_accepted_tokens_per_pos_total"
    ),
}
# families whose engine stat is a list: one sample per element, this label its index from 0
INDEX_LABELS = {"qwen35_ray:spec_decode_num_accepted_tokens_per_pos": "position"}
# names ending in _total that are gauges: sizes, not running totals
GAUGE_NAMES = (
    "qwen35_ray_expert_bytes_total",
    "qwen35_ray_state_slots_total",
    "qwen35_ray_kv_blocks_total",
)


def help_of(name: str) -> str:
    """The HELP text of a family or of a sample name (with _total)."""
    base = name if name in GAUGE_NAMES else name.removesuffix("_total")
    if base in HELP:
        return HELP[base]
    for prefix, text in HELP_PREFIXES.items():
        if base.startswith(prefix):
            return text
    raise KeyError(f"{name} has no HELP text in serving/metrics_catalog.py")


def indexed(name: str, values: list) -> list[tuple]:
    """A list-valued stat as samples of `name`, each labelled with its index
    (INDEX_LABELS), as vLLM labels its per-position counters."""
    base = name.removesuffix("_total")
    if base not in INDEX_LABELS:
        raise KeyError(f"{name} has a list of values but no index label in INDEX_LABELS")
    label = INDEX_LABELS[base]
    return [(name, {label: str(i)}, v) for i, v in enumerate(values)]


def families(samples, labels: dict[str, str] | None = None):
    """Samples (full name, own labels, value) as prometheus_client families, `labels` added to
    each: a name ending in _total is a counter (but GAUGE_NAMES), others gauges. Samples of
    one name share label names (a label one lacks is empty)."""
    labels = labels or {}
    by_name: dict[str, list] = {}
    for name, own, value in samples:
        by_name.setdefault(name, []).append(({**labels, **own}, value))
    for name, group in by_name.items():
        counter = name.endswith("_total") and name not in GAUGE_NAMES
        keys = list(dict.fromkeys(k for own, _ in group for k in own))
        cls = CounterMetricFamily if counter else GaugeMetricFamily
        family = cls(name, help_of(name), labels=keys)
        for own, value in group:
            family.add_metric([str(own.get(k, "")) for k in keys], value)
        yield family
