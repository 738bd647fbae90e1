"""`qwen35-ray serve MODEL [flags]` as a vLLM or SGLang user types it: which flags become which
app settings, which are accepted as what we do anyway, which are refused and why, and the Serve
YAML `--print-config` writes. Pure translation: no Ray is started here
(tests/serving/test_serve_command.py runs the command)."""

import shlex

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from qwen35_ray.deploy.serve_flags import (
    API_KEY_ENV,
    ServeFlagError,
    cpus_reserved,
    main,
    translate,
)
from qwen35_ray.deploy.serve_parser import supported_flags
from qwen35_ray.serving.config import AppConfig

# the seed command lines, model replaced by the tiny one
VLLM_SEED = (
    "qwen35-tiny --port 8000 --tensor-parallel-size 8 --max-model-len 262144 "
    "--reasoning-parser qwen3 --enable-auto-tool-choice --tool-call-parser qwen3_coder"
)
MTP = """--speculative-config '{"method":"qwen3_next_mtp","num_speculative_tokens":2}'"""
SGLANG_SEED = (
    "--model-path qwen35-tiny --port 8000 --tp-size 8 --context-length 262144 "
    "--reasoning-parser qwen3"
)


def cmd(line: str, cuda: bool = False, environ: dict | None = None):
    return translate(shlex.split(line), cuda_available=lambda: cuda, environ=environ or {})


def args(line: str, **kw) -> dict:
    return cmd(line, **kw).args


def refused(line: str, **kw) -> str:
    with pytest.raises(ServeFlagError) as e:
        cmd(line, **kw)
    return str(e.value)


def valid(config: dict) -> AppConfig:
    """The config is one Serve accepts, and its args one the builders accept."""
    ServeDeploySchema.model_validate(config)
    return AppConfig.model_validate(config["applications"][0]["args"])


def test_vllm_seed_line_runs_its_tensor_parallel_size_as_ranks_and_says_so():
    """The seed line runs unchanged: -tp 8 is the nearest thing we have, 8 EP ranks, and the
    user is told, on stderr and in --print-config's header."""
    c = cmd(VLLM_SEED)
    assert valid(c.config).engine.expert_parallel_size == 8
    (note,) = c.notes
    assert "tensor parallel size 8 runs as 8 expert-parallel ranks" in note
    assert "no tensor parallelism" in note
    assert "# Note: tensor parallel size 8" in c.to_yaml()
    assert c.args == cmd(VLLM_SEED + " --enable-expert-parallel").args
    assert cmd(VLLM_SEED + " --enable-expert-parallel").notes == ()


def test_vllm_seed_line_with_expert_parallel_serves_eight_ranks_per_replica():
    c = cmd(VLLM_SEED + " --enable-expert-parallel")
    cfg = valid(c.config)
    assert c.app["import_path"] == "qwen35_ray.serving.builder:build_app"
    assert c.config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert cfg.model == "qwen35-tiny" and cfg.device == "cpu"
    assert cfg.engine.expert_parallel_size == 8 and cfg.engine.max_model_len == 262144
    assert cfg.llm_server.num_replicas == 1


def test_vllm_seed_line_with_mtp_is_refused_for_its_expert_parallel_ranks():
    """-tp 8 runs as 8 expert-parallel ranks, and the MTP layer's experts are not sharded."""
    text = refused(VLLM_SEED + " --enable-expert-parallel " + MTP)
    assert "--speculative-config with 8 expert-parallel ranks" in text
    assert "experts are not sharded across ranks" in text
    assert "not sharded" in refused(VLLM_SEED + " " + MTP)
    # every problem of the line is reported at once
    both = refused(VLLM_SEED + """ -dp 2 --speculative-config '{"method": "ngram"}'""")
    assert "'ngram'" in both and "--data-parallel-size 2" in both


def test_vllm_mtp_speculative_config_reaches_the_engine_as_mtp():
    c = cmd("qwen35-tiny --max-model-len 4096 " + MTP)
    assert valid(c.config).engine.speculative == {"method": "mtp", "num_speculative_tokens": 2}
    assert c.args["engine"]["speculative"] == {"method": "mtp", "num_speculative_tokens": 2}
    for method in ("mtp", "qwen3_5_mtp", "nextn", "Qwen3_Next_MTP"):
        spec = f'{{"method": "{method}", "num_speculative_tokens": 3}}'
        assert args(f"m --speculative-config '{spec}'")["engine"]["speculative"] == {
            "method": "mtp",
            "num_speculative_tokens": 3,
        }
    assert "speculative" not in args("m").get("engine", {})


def test_sglang_nextn_flags_give_vllms_config():
    """SGLang's chain of drafts: top-k 1, draft tokens = steps + 1 (each may be left out)."""
    want = args("m " + MTP)
    for line in (
        "--speculative-algorithm NEXTN --speculative-num-steps 2",
        "--speculative-algo NEXTN --speculative-num-steps 2 --speculative-eagle-topk 1 "
        "--speculative-num-draft-tokens 3",
        "--speculative-algo MTP --speculative-num-draft-tokens 3",
        "--speculative-algorithm nextn --speculative-num-steps 2 --speculative-eagle-topk 1",
    ):
        assert args("m " + line) == want, line


def test_print_config_carries_speculative_to_every_pool(capsys):
    line = "qwen35-tiny --disaggregate --speculative-algo NEXTN --speculative-num-steps 3"
    assert main([*shlex.split(line), "--print-config"]) == 0
    cfg = valid(yaml.safe_load(capsys.readouterr().out))
    for pool in ("prefill_server", "decode_server"):
        assert cfg.engine_for(pool).engine_kwargs["speculative"] == {
            "method": "mtp",
            "num_speculative_tokens": 3,
        }


def test_sglang_seed_line_maps_like_vllms():
    assert cmd(SGLANG_SEED).notes and args(SGLANG_SEED) == args(SGLANG_SEED + " --ep-size 8")
    sglang = args(SGLANG_SEED + " --ep-size 8")
    vllm = args("qwen35-tiny --max-model-len 262144 -tp 8 --enable-expert-parallel")
    assert sglang == vllm
    valid(cmd(SGLANG_SEED + " --ep-size 8").config)


@pytest.mark.parametrize(
    "a, b",
    [
        ("qwen35-tiny", "--model qwen35-tiny"),
        ("qwen35-tiny", "--model-path qwen35-tiny"),
        ("m --max-model-len 4096", "m --context-length 4096"),
        ("m --max-model-len 4096", "m --max_model_len=4096"),
        ("m --max-num-seqs 8", "m --max-running-requests 8"),
        ("m --no-enable-prefix-caching", "m --disable-radix-cache"),
        ("m -tp 2 --enable-expert-parallel", "m --tensor-parallel-size 2 --enable-expert-parallel"),
        ("m -tp 2 --enable-expert-parallel", "m --tp 2 --ep 2"),
        ("m -tp 2 --enable-expert-parallel", "m --tp-size 2 --expert-parallel-size 2"),
        ("m -tp 2 --enable-expert-parallel", "m -dp 2 --enable-expert-parallel"),
        ("m --ep-size 2", "m --expert-parallel-size 2"),
        ("m --dtype float", "m --dtype float32"),
        ("m --kv-cache-memory-bytes 64MiB", "m --kv-cache-memory-bytes 67108864"),
    ],
)
def test_spellings_of_one_setting_give_one_config(a, b):
    assert args(a) == args(b)


def test_engine_flags_reach_the_engine():
    cfg = valid(
        cmd(
            "m --served-model-name qwen --dtype bfloat16 --max-model-len 4096 --max-num-seqs 8 "
            "--max-num-batched-tokens 512 --block-size 32 --kv-cache-memory-bytes 1GiB "
            "--no-enable-prefix-caching --num-replicas 2 --num-cpus 2"
        ).config
    )
    e = cfg.engine
    assert (cfg.model_name, cfg.dtype) == ("qwen", "bfloat16")
    assert (e.max_model_len, e.max_num_seqs, e.max_num_batched_tokens) == (4096, 8, 512)
    assert (e.block_size, e.kv_cache_memory_bytes, e.enable_prefix_caching) == (32, 2**30, False)
    assert (cfg.llm_server.num_replicas, cfg.llm_server.num_cpus) == (2, 2)


def test_accepted_flags_change_nothing():
    """What we do anyway: accepted, and the config is the same as without them."""
    extra = (
        "--trust-remote-code --enable-auto-tool-choice --tool-call-parser qwen3_coder "
        "--reasoning-parser qwen3 --enable-metrics --enforce-eager --generation-config auto"
    )
    assert args("qwen35-tiny " + extra) == args("qwen35-tiny")


@pytest.mark.parametrize(
    "line, names",
    [
        ("m --gpu-memory-utilization 0.9", ["--gpu-memory-utilization", "--kv-cache-memory-bytes"]),
        ("m --mem-fraction-static 0.8", ["--mem-fraction-static", "--kv-cache-memory-bytes"]),
        ("m --dtype half", ["--dtype half", "bfloat16"]),
        ("m --dtype float16", ["--dtype float16", "bfloat16"]),
        ("m --dtype int8", ["--dtype int8"]),
        ('m --speculative-config \'{"method": "mtp"}\'', ["num_speculative_tokens is required"]),
        ('m --speculative-config \'{"method": "ngram"}\'', ["'ngram'", "not supported"]),
        (
            'm --speculative-config \'{"method": "mtp", "num_speculative_tokens": 5}\'',
            ["--speculative-config: ", "num_speculative_tokens=5", "from 1 to 4"],
        ),
        (
            "m --speculative-config "
            """'{"method": "mtp", "num_speculative_tokens": 2, "model": "d"}'""",
            ["--speculative-config: model not supported"],
        ),
        ("m --speculative-config '{nope'", ["--speculative-config is not JSON"]),
        ("m --speculative-config '[2]'", ["--speculative-config must be a JSON object"]),
        ("m --speculative-algorithm NEXTN", ["needs --speculative-num-steps"]),
        ("m --speculative-algorithm EAGLE --speculative-num-steps 2", ["EAGLE", "NEXTN"]),
        ("m --speculative-algorithm NGRAM", ["NGRAM is not supported"]),
        ("m --speculative-algo NEXTN --speculative-num-steps 5", ["--speculative-num-steps 5"]),
        ("m --speculative-algo NEXTN --speculative-num-steps 0", ["at least 1"]),
        (
            "m --speculative-algo NEXTN --speculative-num-steps 3 --speculative-eagle-topk 4",
            ["--speculative-eagle-topk 4", "tree", "--speculative-eagle-topk 1"],
        ),
        (
            "m --speculative-algo NEXTN --speculative-num-steps 3 --speculative-num-draft-tokens 8",
            ["--speculative-num-draft-tokens 8", "--speculative-num-draft-tokens 4"],
        ),
        ("m --speculative-algo NEXTN --speculative-num-draft-tokens 1", ["from 2 to 5"]),
        ("m --speculative-num-steps 2", ["needs --speculative-algorithm NEXTN"]),
        (
            "m " + MTP + " --speculative-algo NEXTN",
            ["--speculative-config is vLLM's spelling of --speculative-algorithm"],
        ),
        ("m --ep-size 2 " + MTP, ["2 expert-parallel ranks", "not sharded"]),
        ("m --reasoning-parser deepseek_r1", ["--reasoning-parser deepseek_r1", "qwen3"]),
        ("m --tool-call-parser hermes", ["--tool-call-parser hermes", "qwen3_coder"]),
        ("m --seed 0", ["--seed", "`seed` in the request body"]),
        ("m --generation-config vllm", ["--generation-config vllm"]),
        ("m --served-model-name a b", ["--served-model-name"]),
        ("m -dp 2", ["--num-replicas 2"]),
        ("m --ep-size 4 -tp 2", ["--ep-size 4"]),
        ("m -tp 4 --ep-size 2 --enable-expert-parallel", ["disagrees"]),
        ("m --num-gpus 1", ["--num-gpus 1 needs --device cuda"]),
        ("m --prefill-replicas 2", ["--prefill-replicas needs --disaggregate"]),
        ("m --disaggregate --num-replicas 2", ["--prefill-replicas and --decode-replicas"]),
        ("m --api-key k --api-key-file f", ["--api-key", "--api-key-file"]),
        ("m --kv-cache-memory-bytes 20GB", ["KiB, MiB, GiB or TiB"]),
        ("m --max-num-seqs 0", ["at least 1"]),
        ("m --port 70000", ["--port 70000"]),
        ("", ["no model"]),
        ("a --model b", ["two models"]),
    ],
)
def test_refusals_name_the_flag_and_the_way_out(line, names):
    text = refused(line)
    for name in names:
        assert name in text, text


@pytest.mark.parametrize(
    "flag", ["--swap-space 4", "--foo", "--max-model 4096", "--lora-modules=x"]
)
def test_an_unknown_flag_is_an_error_naming_it(flag):
    text = refused("qwen35-tiny " + flag)
    assert text.startswith(f"unsupported flag {flag.split()[0].split('=')[0]} ")
    assert "qwen35-ray serve takes: " in text and "--max-model-len" in text
    # a refused flag is not advertised as one we take
    assert "--gpu-memory-utilization" not in text


def test_every_supported_flag_is_documented_in_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in supported_flags():
        assert flag in out
    assert "no checkpoint code is ever run" in out


def test_disaggregate_builds_the_pd_app_with_its_pools():
    c = cmd("m --disaggregate --prefill-replicas 2 --decode-replicas 3 --ep-size 2")
    cfg = valid(c.config)
    assert c.app["import_path"] == "qwen35_ray.serving.builder:build_pd_app"
    assert (cfg.prefill_server.num_replicas, cfg.decode_server.num_replicas) == (2, 3)
    assert cfg.engine_for("decode_server").expert_parallel_size == 2


def test_cuda_gives_each_engine_process_a_gpu():
    one = valid(cmd("m", cuda=True).config)
    assert (one.device, one.llm_server.num_gpus) == ("cuda", 1)
    ep = valid(cmd("m --ep-size 8", cuda=True).config)
    assert (ep.engine.rank_num_gpus, ep.llm_server.num_gpus) == (1, 0)
    assert valid(cmd("m --device cpu", cuda=True).config).device == "cpu"
    assert valid(cmd("m --device cuda --num-gpus 2").config).llm_server.num_gpus == 2


def test_api_key_goes_through_the_environment_never_into_the_config(capsys):
    c = cmd("qwen35-tiny --api-key s3cret")
    assert c.api_key == "s3cret" and c.args["api_key_env"] == API_KEY_ENV
    assert "s3cret" not in repr(c) and "s3cret" not in c.to_yaml()
    assert "--api-key '***'" in c.to_yaml() and API_KEY_ENV in c.to_yaml()
    assert cmd("m --api-key=s3cret").argv[-1] == "--api-key=***"
    # vLLM's environment variable, as vLLM reads it
    assert args("m", environ={"VLLM_API_KEY": "k"})["api_key_env"] == "VLLM_API_KEY"
    assert args("m --api-key-env MY_KEY")["api_key_env"] == "MY_KEY"


def test_a_relative_checkpoint_directory_becomes_absolute(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    assert args("ckpt")["model"] == str(tmp_path / "ckpt")


def test_print_config_is_a_serve_config_that_says_where_it_came_from(capsys):
    line = "qwen35-tiny --port 8123 --enable-expert-parallel -tp 2 --api-key k --device cpu"
    assert main([*shlex.split(line), "--print-config"]) == 0
    out = capsys.readouterr().out
    head = [x for x in out.splitlines() if x.startswith("#")]
    assert head[0].startswith("# Written by: qwen35-ray serve qwen35-tiny --port 8123")
    config = yaml.safe_load(out)
    cfg = valid(config)
    assert config["http_options"]["port"] == 8123 and cfg.engine.expert_parallel_size == 2
    assert cfg.api_key_env == API_KEY_ENV and cfg.api_key is None


def test_local_ray_cpus_cover_the_ingress_replicas_and_ranks():
    c = cmd("m --enable-expert-parallel -tp 2")
    # ingress 0.5 + replica 1 + 2 ranks x 1
    assert cpus_reserved(c.args, c.builder) == 3.5
    c = cmd("m --disaggregate --decode-replicas 2 --num-cpus 0.5")
    assert cpus_reserved(c.args, c.builder) == 0.5 + 0.5 + 2 * 0.5
