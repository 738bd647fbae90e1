"""Bounds on what one request may ask for, checked at the ingress before any work starts.

Each bound keeps a user-controlled input from costing more than its own request: counts and
lengths that the engine scans every step (stop strings, banned or biased tokens), integer ranges
the sampler must represent (seeds as int64), and nesting that Python's parsers recurse on.
docs/security.md lists them with the reason for each.
"""

# OpenAI documents seed as an int64; torch generators take nothing wider
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

MAX_N = 16
MAX_LOGPROBS = 20

# stop strings are searched in every output's new text each step
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 64

# OpenAI's own limit on logit_bias entries, and its value range
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_MIN, LOGIT_BIAS_MAX = -100.0, 100.0

# vLLM asks only for > 0; the lower bound keeps logits / penalty finite in float32, the upper
# bound is far past any useful value
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.01, 10.0

MAX_THINKING_TOKEN_BUDGET = 2**31 - 1

MAX_TOOLS = 128

# messages' total size is bounded by AppConfig.max_request_bytes, the body cap (a character
# takes at least one byte of JSON); the count bounds the template's loop
MAX_MESSAGES = 2048

# chat_template_kwargs are switches for the template (enable_thinking), not payloads
MAX_TEMPLATE_KWARGS = 16
MAX_TEMPLATE_KWARG_LENGTH = 1024

# /v1/completions with a list of prompts: all are tokenized before any starts
MAX_PROMPTS = 64
MAX_TOTAL_PROMPT_TOKENS = 2**18

# json.loads recurses per level; bodies are refused before parsing past this depth
MAX_JSON_DEPTH = 64
