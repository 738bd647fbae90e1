"""`qwen35-ray bench offline --speculative 0 2` at tiny sizes: it runs from the CLI, writes its
JSON, and its speculative numbers agree with each other and with greedy decoding (no timing
thresholds). On qwen35-tiny the random MTP head keeps next to nothing; the slow test runs it on
a checkpoint whose head keeps drafts."""

import json

import pytest

from qwen35_ray.cli import main

PROMPTS, NEW_TOKENS = 3, 10


def bench(model: str, out) -> dict:
    argv = ["bench", "offline", "--model", model, "--speculative", "0", "2"]
    argv += ["--num-prompts", str(PROMPTS), "--new-tokens", str(NEW_TOKENS)]
    argv += ["--input-len", "8", "16", "--concurrency", "1", "3", "--repeats", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["bench"] == "offline-speculative" and report["command"].endswith(str(out))
    return report


def check_rows(report: dict) -> list[dict]:
    """The k = 2 rows, after checking every row."""
    rows = report["results"]
    # k = 0 as the default engine and with compile_decode=False, then k = 2, per concurrency
    assert [(r["concurrency"], r["variant"]) for r in rows] == [
        (c, v) for c in (1, 3) for v in ("k=0", "k=0 eager", "k=2")
    ]
    assert len(report["runs"]) == 2 * 3 * 2
    for row in rows:
        assert row["repeats"] == 2 and row["num_prompts"] == PROMPTS
        assert row["output_tokens"] == PROMPTS * NEW_TOKENS and row["output_tokens_per_s"] > 0
        # greedy speculative decoding gives plain greedy decoding's tokens
        assert row["same_outputs"] == PROMPTS
        (base,) = [r for r in rows if r["concurrency"] == row["concurrency"] and r["k"] == 0
                   and r["compile_decode"] is None]  # fmt: skip
        assert row["speedup"] == row["output_tokens_per_s"] / base["output_tokens_per_s"]
        # the median of the per-repeat ratios (2 repeats: their mean)
        ratios = [a / b for a, b in zip(row["output_tokens_per_s_runs"],
                                        base["output_tokens_per_s_runs"])]  # fmt: skip
        assert row["speedup_paired"] == pytest.approx(sum(ratios) / 2)
        if row["k"] == 0:
            assert "drafts" not in row and "mean_accept_length" not in row
            continue
        drafts, accepted, per_pos = row["drafts"], row["accepted"], row["accepted_per_pos"]
        assert drafts > 0 and row["draft_tokens"] == 2 * drafts
        assert len(per_pos) == 2 and sum(per_pos) == accepted
        # a second draft is kept only after the first
        assert per_pos[0] >= per_pos[1]
        assert row["mean_accept_length"] == 1 + accepted / drafts
        assert row["acceptance_per_pos"] == [a / drafts for a in per_pos]
        # every verify row gives 1 + its kept drafts (fewer when max_tokens cuts the last
        # one): at least the two repeats' tokens, less each prompt's first (from its prefill)
        assert drafts + accepted >= 2 * PROMPTS * (NEW_TOKENS - 1)
    return [r for r in rows if r["k"] == 2]


def test_bench_offline_speculative_reports_drafts_beside_plain_decoding(tmp_path):
    check_rows(bench("qwen35-tiny", tmp_path / "spec.json"))


@pytest.mark.slow
def test_bench_offline_speculative_on_a_head_that_keeps_drafts(tmp_path, chain_checkpoint):
    # a head that keeps drafts (tests/support/chain.py)
    for row in check_rows(bench(str(chain_checkpoint("qwen35-tiny")), tmp_path / "spec.json")):
        assert row["accepted"] > 0 and row["mean_accept_length"] > 1
