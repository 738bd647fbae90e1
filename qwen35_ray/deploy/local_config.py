"""A Serve YAML from deployments/ rewritten for the local multi-node cluster (cluster/local.sh).

Several Ray nodes on one host cannot all bind the same HTTP port, so the proxy runs on the head
only (`proxy_location: HeadOnly`) at the port the cluster chose; `POOL=RESOURCE` pins put a pool
on the nodes advertising RESOURCE (`resources: {RESOURCE: 0.01}`, see cluster/README.md). The
result's app args are checked with AppConfig, so a bad pin fails here, naming the setting.

    python -m qwen35_ray.deploy.local_config deployments/qwen35-pd.yaml --out /tmp/pd.yaml \\
        --http-port 18080 --pin prefill_server=prefill_node --pin decode_server=decode_node
"""

import argparse
import copy
import sys
from pathlib import Path

import pydantic
import yaml

from qwen35_ray.serving.config import AppConfig

# the deployments each builder of qwen35_ray.serving.builder makes, under their `args` keys
BUILDER_POOLS = {
    "build_app": ("ingress", "llm_server"),
    "build_pd_app": ("ingress", "prefill_server", "decode_server"),
}
BUILDER_MODULE = "qwen35_ray.serving.builder"
# what a pinned replica asks of the resource; nodes advertise 100 (cluster/local.sh), so the
# amount never limits how many replicas share a node
PIN_AMOUNT = 0.01


class ConfigError(ValueError):
    """A config or pin the local cluster cannot deploy; the message names the setting."""


def parse_pins(specs: list[str]) -> dict[str, str]:
    """`POOL=RESOURCE` strings as {pool: resource}."""
    pins: dict[str, str] = {}
    for spec in specs:
        pool, sep, resource = spec.partition("=")
        pool, resource = pool.strip(), resource.strip()
        if not sep or not pool or not resource:
            raise ConfigError(
                f"pin {spec!r} is not POOL=RESOURCE (e.g. prefill_server=prefill_node)"
            )
        if pool in pins and pins[pool] != resource:
            raise ConfigError(f"pool {pool!r} is pinned twice ({pins[pool]!r} and {resource!r})")
        pins[pool] = resource
    return pins


def app_pools(app: dict) -> tuple[str, ...]:
    """The deployments (ingress and engine pools) of one application entry."""
    name = app.get("name", "?")
    path = app.get("import_path", "")
    module, _, builder = path.partition(":")
    if module != BUILDER_MODULE or builder not in BUILDER_POOLS:
        known = ", ".join(f"{BUILDER_MODULE}:{b}" for b in BUILDER_POOLS)
        raise ConfigError(f"application {name!r}: import_path {path!r} is not one of {known}")
    return BUILDER_POOLS[builder]


def _validation_lines(e: pydantic.ValidationError) -> str:
    return "\n".join(
        f"  {'.'.join(map(str, err['loc'])) or 'args'}: {err['msg']}" for err in e.errors()
    )


def rewrite(
    config: dict, http_port: int, pins: dict[str, str], http_host: str = "127.0.0.1"
) -> dict:
    """A copy of `config` for the local cluster: the proxy on the head at http_host:http_port,
    each pinned pool asking for PIN_AMOUNT of its resource. Raises ConfigError."""
    if not 0 < http_port < 65536:
        raise ConfigError(f"--http-port {http_port} is not a TCP port (1-65535)")
    apps = config.get("applications") if isinstance(config, dict) else None
    if not apps or not isinstance(apps, list):
        raise ConfigError("the config has no `applications` list; is it a Serve config file?")
    out = copy.deepcopy(config)
    out["proxy_location"] = "HeadOnly"
    out["http_options"] = {**(out.get("http_options") or {}), "host": http_host, "port": http_port}
    for app in out["applications"]:
        name = app.get("name", "?")
        pools = app_pools(app)
        args = app.setdefault("args", {}) or {}
        app["args"] = args
        for pool, resource in pins.items():
            if pool not in pools:
                raise ConfigError(
                    f"pin {pool}={resource}: application {name!r} ({app['import_path']}) has no "
                    f"pool {pool!r}; its deployments are {', '.join(pools)}"
                )
            section = args.get(pool)
            if section is None:
                section = args[pool] = {}
            if not isinstance(section, dict):
                raise ConfigError(f"application {name!r}: args.{pool} is not a mapping")
            section["resources"] = {**(section.get("resources") or {}), resource: PIN_AMOUNT}
        try:
            AppConfig.model_validate(args)
        except pydantic.ValidationError as e:
            raise ConfigError(
                f"application {name!r}: invalid qwen35-ray app args:\n{_validation_lines(e)}"
            ) from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qwen35_ray.deploy.local_config",
        description="Rewrite a Serve config for the local multi-node cluster (cluster/local.sh): "
        "proxy on the head only, the cluster's HTTP port, pools pinned to nodes.",
    )
    p.add_argument("config", help="a Serve config, e.g. deployments/qwen35-pd.yaml")
    p.add_argument("--out", required=True, help="where to write the rewritten config")
    p.add_argument("--http-port", type=int, required=True, help="the Serve proxy's port")
    p.add_argument("--http-host", default="127.0.0.1", help="the proxy's address (127.0.0.1)")
    p.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="POOL=RESOURCE",
        help="pin a pool (ingress, llm_server, prefill_server, decode_server) to the nodes "
        "advertising RESOURCE; repeatable",
    )
    args = p.parse_args(argv)
    try:
        text = Path(args.config).read_text()
    except OSError as e:
        print(f"error: cannot read {args.config}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        config = yaml.safe_load(text)
        out = rewrite(config, args.http_port, parse_pins(args.pin), args.http_host)
    except yaml.YAMLError as e:
        print(f"error: {args.config} is not valid YAML: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    header = f"# {args.config} rewritten by qwen35_ray.deploy.local_config for cluster/local.sh\n"
    Path(args.out).write_text(header + yaml.safe_dump(out, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
