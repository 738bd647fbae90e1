"""`qwen35-ray bench sampler` at tiny sizes: it runs from the CLI and writes its JSON."""

import json

from qwen35_ray.cli import main


def test_bench_sampler_writes_old_and_new_times(tmp_path):
    out = tmp_path / "sampler.json"
    argv = ["bench", "sampler", "--vocab", "300", "--batch", "1", "3", "--old-max-batch", "1"]
    assert main([*argv, "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["vocab"] == 300 and report["machine"]["device"] == "cpu"
    got = {(r["setting"], r["batch"]): r for r in report["results"]}
    assert set(got) == {(s, b) for s in ("default", "greedy", "top_p") for b in (1, 3)}
    for (_, batch), r in got.items():
        assert r["new_ms"] > 0
        # today's sampler only up to --old-max-batch
        assert ("old_ms" in r) == (batch == 1)
    assert got[("default", 1)]["top_k"] == 20 and got[("default", 1)]["top_p"] == 0.95
