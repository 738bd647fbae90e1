"""Embedded tiny Qwen3.5 checkpoints, generated on first use into a cache directory."""

import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED = ("qwen35-tiny", "qwen35-tiny-dense")
# bump when the generator changes, so caches of an older layout are not reused
# (2: preprocessor_config.json)
VERSION = 2


def ensure_tiny(name: str, cache: Path) -> Path:
    """Path of embedded model `name`, generating it if the cache lacks it."""
    from qwen35_ray.model.tiny.checkpoint import write_tiny

    target = Path(cache) / f"{name}-v{VERSION}"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename, so concurrent first uses never see half a checkpoint
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write_tiny(tmp, dense=name.endswith("-dense"))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
