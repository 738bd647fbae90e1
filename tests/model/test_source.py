"""Which files a hub model brings: everything for an engine, the small files for the ingress."""

import huggingface_hub
import pytest

from qwen35_ray.model import source


@pytest.fixture
def fetched(monkeypatch, tmp_path):
    calls = []

    def snapshot_download(model, allow_patterns, local_files_only):
        calls.append((allow_patterns, local_files_only))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_the_ingress_fetches_no_weights(fetched, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    source.resolve_model("Qwen/Qwen3.5-35B-A3B", weights=False)
    source.resolve_model("Qwen/Qwen3.5-35B-A3B")
    (small, offline), (full, _) = fetched
    assert not any("safetensors" in p for p in small) and "tokenizer*" in small
    assert "*.safetensors" in full and not offline


def test_offline_reads_the_cache_only(fetched, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source.resolve_model("Qwen/Qwen3.5-35B-A3B", weights=False)
    assert fetched[0][1] is True


def test_a_local_directory_is_used_as_is(fetched, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert source.resolve_model(str(tmp_path), weights=False) == tmp_path and not fetched
