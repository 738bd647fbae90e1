"""A small byte-level BPE tokenizer with the Qwen3.5 special tokens, written in hub format.

The tiny test model needs a tokenizer that `transformers.AutoTokenizer` loads and whose chat
template renders exactly like the real Qwen3.5 one, without shipping the 248k-token original.
Regular ids are the 256 byte tokens followed by merges learned from `CORPUS`; the special tokens
follow them contiguously, in the real order.
"""

import json
from importlib import resources
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

# The Qwen2/Qwen3 split regex: contractions, letter runs with one leading non-letter, single
# digits, punctuation runs, newline runs and whitespace.
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# In the real tokenizer these hold ids 248044..248069, in this order.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]

# Qwen3 marks only the `<|...|>` control tokens special, except the fim/repo ones: tool-call and
# think tags must survive `skip_special_tokens=True` so that parsers still see them.
NOT_SPECIAL = {
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
}

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 262144
MAX_VOCAB = 8192

CORPUS = """\
The quick brown fox jumps over the lazy dog. This is a small model that is used for tests, and it
should still read English well enough: the words people use most often should be one token or a
few. You can ask it a question, and it will give you an answer. What is the time? Where are we
going today? I think that we should go home now, because it is late and the weather is not good.
They said that there was a problem with the server, so we will try again in a minute or two.
Please write a short story about a cat who lives in a big house with a little garden. The cat
likes to sleep in the sun, to eat fish, and to watch the birds from the window every morning.
Hello! How are you? I am fine, thank you. Can you help me with my code? Sure, what do you need?
The user asked the assistant to explain how the system works, and the assistant explained it.
A language model reads a prompt, predicts the next token, and then repeats until it is done.
Each request has a prompt, a number of tokens to generate, a temperature, and a stop sequence.
The first, second and third results were good, but the last one was wrong. One, two, three, four,
five, six, seven, eight, nine, ten. Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
There are many things in the world that we do not know yet, and that is why people study them.
He was here before she came back, and after that they all went out together to find some food.
It would be better if you could tell me more about what happened, when it happened and why.
Water, fire, earth and air; light and dark; day and night; old and new; high and low; hot, cold.
We have been working on this for a long time, and we hope it will be useful for other people.
Let me know if you have any other questions. Here is the result of the function you called.
The weather in Paris is sunny, with a temperature of twenty degrees; in London it is raining.
the of and to in is that it for you was with on as have be at by this not are from or his had
but what all were when we there can an your which their said if do will each about how up out
them then she many some so these would other into has more her two like him see time could no
make than first been its who now people my made over did down only way find use may long little
very after words called just where most know get through back much before go good new write our
used me man too any day same right look think also around another came come work three word must
because does part even place well such here take why things help put years different away again
off went old number great tell men say small every found still between name should home big give
air line set own under read last never us left end along while might next sound below saw something
thought both few those always looked show large often together asked house world going want
def main(argv: list[str]) -> int:
    \"\"\"Run the server and return its exit status.\"\"\"
    import json
    from pathlib import Path

    class Config:
        def __init__(self, name: str, value: int = 0) -> None:
            self.name = name
            self.value = value

    for index, item in enumerate(argv):
        if item is None or not isinstance(item, str):
            continue
        elif item.startswith("--"):
            print(f"option {index}: {item}")
        else:
            return len(item) + 1
    while True:
        try:
            result = json.loads(Path("config.json").read_text())
        except (OSError, ValueError) as error:
            raise RuntimeError(str(error)) from error
        return 0
{"name": "get_weather", "description": "Get the current weather in a city", "parameters":
{"type": "object", "properties": {"location": {"type": "string", "description": "The city"},
"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location"]}}
user assistant system tool function parameter content role type text image video tools
<tool_call>
<function=get_weather>
<parameter=location>
Paris
</parameter>
</function>
</tool_call>
"""


def write_tokenizer(out_dir: Path) -> int:
    """Write tokenizer.json and tokenizer_config.json into out_dir; return the full vocab size."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    config = _tokenizer_config(base_vocab=tokenizer.get_vocab_size(with_added_tokens=False))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8"
    )
    return tokenizer.get_vocab_size(with_added_tokens=True)


def chat_template() -> str:
    """The Qwen3.5-equivalent chat template shipped beside this module."""
    return resources.files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")


def _byte_alphabet() -> list[str]:
    # GPT-2's printable stand-ins for the 256 bytes, in GPT-2/Qwen id order: printable Latin-1
    # bytes map to themselves, the rest to U+0100 onwards.
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    shifted = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(shifted))]


def _empty_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    tokenizer = Tokenizer(
        models.BPE(
            vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
        )
    )
    # No NFC normalizer (the real one has it): exact byte round trip matters more for tests.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _learn_merges() -> list[tuple[str, str]]:
    # Merging down to count 1 makes every word of the corpus a single token; the corpus is small
    # enough that this stays far below MAX_VOCAB. The trainer breaks count ties by pair, so the
    # merges are the same on every run.
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB - len(SPECIAL_TOKENS),
        initial_alphabet=_byte_alphabet(),
        show_progress=False,
    )
    scratch = _empty_tokenizer({}, [])
    scratch.train_from_iterator([CORPUS], trainer)
    return [tuple(pair) for pair in json.loads(scratch.to_str())["model"]["merges"]]


def _build_tokenizer() -> Tokenizer:
    merges = _learn_merges()
    # Ids: bytes in GPT-2 order, then each merged token in merge order, as in the real vocab.
    tokens = _byte_alphabet() + [left + right for left, right in merges]
    tokenizer = _empty_tokenizer({token: i for i, token in enumerate(tokens)}, merges)
    tokenizer.add_tokens(
        [
            AddedToken(token, special=token not in NOT_SPECIAL, normalized=False)
            for token in SPECIAL_TOKENS
        ]
    )
    return tokenizer


def _tokenizer_config(base_vocab: int) -> dict:
    added = {
        str(base_vocab + i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token not in NOT_SPECIAL,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        # The generic class loads tokenizer.json as written; Qwen2Tokenizer would rebuild the
        # pipeline and add an NFC normalizer.
        "tokenizer_class": "TokenizersBackend",
        "unk_token": None,
    }
