"""Where a model comes from: an embedded tiny checkpoint, a local directory or a hub id."""

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# what the tokenizer, chat template, config and generation defaults are read from
TOKENIZER_FILES = ["*.json", "*.jinja", "*.txt", "tokenizer*", "vocab*", "merges*"]
HUB_FILES = [*TOKENIZER_FILES, "*.safetensors"]


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN35_RAY_CACHE", Path.home() / ".cache" / "qwen35-ray"))


def resolve_model(model: str, weights: bool = True) -> Path:
    """Return a local checkpoint directory for `model`; weights=False fetches only the small
    files (config, tokenizer, template) of a hub model, for processes that never load weights.

    An embedded name (`qwen35-tiny`, `qwen35-tiny-dense`) is generated into the cache on first
    use; an existing directory is used as is; anything else is a hub id fetched with
    huggingface_hub (which honours HF_HUB_OFFLINE and its own cache).
    """
    from qwen35_ray.model.tiny import EMBEDDED, ensure_tiny

    if model in EMBEDDED:
        return ensure_tiny(model, cache_dir())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json; is it a model checkpoint?")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FileNotFoundError(
            f"model {model!r} is neither an embedded model ({', '.join(EMBEDDED)}), "
            "a checkpoint directory, nor a hub id of the form owner/name"
        )
    from huggingface_hub import snapshot_download

    # read at call time: huggingface_hub reads its own copy once, at import
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")
    log.info("fetching %s from the Hugging Face hub%s", model, " cache" if offline else "")
    try:
        path = snapshot_download(
            model,
            allow_patterns=HUB_FILES if weights else TOKENIZER_FILES,
            local_files_only=offline,
        )
        return Path(path)
    except Exception as e:
        hint = " (HF_HUB_OFFLINE is set and it is not in the local hub cache)" if offline else ""
        raise FileNotFoundError(f"could not get model {model!r} from the hub{hint}: {e}") from e
