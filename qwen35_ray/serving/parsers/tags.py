"""The tags Qwen3.5 writes into its output, and the hold-back rule streaming parsers share."""

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


def partial_tag_len(text: str, *tags: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`.

    A streaming parser holds that many characters back: the next delta decides whether they
    open a tag or are plain text.
    """
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best
