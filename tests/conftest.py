"""Suite-wide setup. Shared helpers live in tests/support (tests/ is not a package, so that the
repo root, and with it the `kernels/` folder, never lands on sys.path)."""

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run on CPU through the interpreter, which must be chosen before
# triton is first imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Engines compile their decode step in the background by default (EngineConfig.compile_decode
# None); hundreds of test engines doing so would compete for the CPU. Tests of the compiled
# step ask for it (compile_decode=True), or clear this (test_serve_run, the default path).
os.environ.setdefault("QWEN35_RAY_COMPILE_DECODE", "0")
sys.path.insert(0, str(Path(__file__).parent / "support"))
# Tests stop servers with SIGINT as Ctrl-C does. A suite started with SIGINT ignored (`pytest &`
# from a script without job control) would pass that on to every child, and `serve run`
# would ignore them: Ctrl-C's default handler for this process, so its children start with it
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def chain_checkpoint(tmp_path_factory):
    """chain_checkpoint(model) -> a checkpoint whose MTP head keeps drafts (support/chain.py),
    distilled once per session per model."""
    from chain import ChainCheckpoints

    return ChainCheckpoints(tmp_path_factory)
