"""`qwen35-ray k8s render [--check]`: the KubeRay manifests in k8s/, rendered from deployments/.

Each RayService sample carries its deployments/ file as serveConfigV2, verbatim, so the two
cannot drift: edit deployments/<file> (the apps) or the table below (the cluster), then render.
`--check` writes nothing and exits 1 naming every file that differs from what render would write.
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from qwen35_ray.deploy.rayservice import (
    KUBERAY_VERSION,
    ClusterSpec,
    WorkerGroup,
    ray_version,
    raycluster_yaml,
    rayservice_yaml,
)

CPU_IMAGE = "qwen35-ray:latest"  # docker build -f cluster/Dockerfile -t qwen35-ray:latest .
CUDA_IMAGE = "qwen35-ray:cuda"  # the CUDA variant (k8s/README.md)
H100 = "NVIDIA-H100-80GB-HBM3"  # the nvidia.com/gpu.product label of an H100 SXM 80 GB
HUB_CACHE_PVC = "qwen35-hub-cache"  # k8s/hub-cache-pvc.yaml
HF_SECRET = "hf-token"  # kubectl create secret generic hf-token --from-literal=HF_TOKEN=...
# the convention of the app configs: a pinned pool asks for 0.01 of what its nodes advertise
POOL_NODE = 100


@dataclass(frozen=True)
class Sample:
    out: str  # file name under k8s/
    source: str | None  # the deployments/ file (a RayService); None: a RayCluster
    spec: ClusterSpec
    about: str  # what it is, for the header comment


SAMPLES = (
    Sample(
        "rayservice-qwen35.yaml",
        "qwen35.yaml",
        ClusterSpec(
            name="qwen35",
            image=CPU_IMAGE,
            head_cpus=1,
            head_memory="3Gi",
            workers=(WorkerGroup("cpu", 1, 1, 2, cpus=2, memory="4Gi"),),
        ),
        "qwen35-ray on Kubernetes (KubeRay RayService), collocated: one LLMServer replica and the\n"
        "OpenAI ingress on CPU with the embedded tiny model; no GPU, no download, no token.\n"
        "Fits kind or minikube with 3 CPUs and 7 GiB free (head 1 CPU / 3 GiB, one worker\n"
        "2 CPUs / 4 GiB; the autoscaler may add a second worker while replicas roll).",
    ),
    Sample(
        "rayservice-qwen35-pd.yaml",
        "qwen35-pd.yaml",
        ClusterSpec(
            name="qwen35-pd",
            image=CPU_IMAGE,
            head_cpus=1,
            head_memory="3Gi",
            workers=(WorkerGroup("cpu", 1, 1, 2, cpus=2, memory="6Gi"),),
        ),
        "qwen35-ray on Kubernetes (KubeRay RayService), prefill/decode disaggregated on CPU with\n"
        "the embedded tiny model: a PrefillServer and a DecodeServer replica and the ingress;\n"
        "GDN states and K/V move from prefill to decode through the Ray object store.\n"
        "Fits kind or minikube with 3 CPUs and 9 GiB free (head 1 CPU / 3 GiB, one worker\n"
        "2 CPUs / 6 GiB; the autoscaler may add a second worker while replicas roll).",
    ),
    Sample(
        "rayservice-qwen35-35b-a3b-pd.yaml",
        "gpu/qwen35-35b-a3b-pd.yaml",
        ClusterSpec(
            name="qwen35-35b-a3b-pd",
            image=CUDA_IMAGE,
            head_cpus=4,
            head_memory="16Gi",
            workers=(
                WorkerGroup(
                    "prefill-gpu",
                    1,
                    1,
                    4,
                    cpus=8,
                    memory="128Gi",
                    gpus=1,
                    ray_resources={"prefill_node": POOL_NODE},
                    gpu_product=H100,
                ),
                WorkerGroup(
                    "decode-gpu",
                    1,
                    1,
                    4,
                    cpus=16,
                    memory="192Gi",
                    gpus=2,
                    ray_resources={"decode_node": POOL_NODE},
                    gpu_product=H100,
                ),
            ),
            hub_cache=HUB_CACHE_PVC,
            hf_token_secret=HF_SECRET,
            idle_timeout_s=300,
        ),
        "qwen35-ray on Kubernetes (KubeRay RayService): Qwen/Qwen3.5-35B-A3B in bf16 on\n"
        "H100 80 GB, prefill/decode disaggregated, each pool on a GPU worker group of its own\n"
        "and autoscaled.\n"
        "- prefill-gpu: pods of 1 GPU advertising prefill_node; a prefill replica is 1 GPU\n"
        "  (64.56 GiB of weights, 4.96 GiB of caches: 8 prompts of up to 32k tokens).\n"
        "- decode-gpu: pods of 2 GPUs advertising decode_node; a decode replica is an\n"
        "  expert-parallel group of 2 ranks (34.56 GiB of weights and 33.68 GiB of caches\n"
        "  per GPU: 64 sequences per rank). On one GPU a decode replica would hold 7\n"
        "  sequences of 32k.\n"
        "Serve adds a replica when its pool's policy asks (TTFT for prefill, ITL and KV\n"
        "occupancy for decode); the Ray autoscaler adds the pod that replica waits for, up to\n"
        "4 per group. The figures: the header of deployments/gpu/qwen35-35b-a3b-pd.yaml.\n"
        "Needs: the hub-cache PVC (k8s/hub-cache-pvc.yaml, ReadWriteMany) and, for a gated\n"
        "checkpoint, the Secret hf-token with key HF_TOKEN.",
    ),
    Sample(
        "rayservice-qwen35-397b-a17b.yaml",
        "gpu/qwen35-397b-a17b.yaml",
        ClusterSpec(
            name="qwen35-397b-a17b",
            image=CUDA_IMAGE,
            head_cpus=8,
            head_memory="32Gi",
            workers=(
                WorkerGroup("h100", 2, 2, 2, cpus=96, memory="1024Gi", gpus=8, gpu_product=H100),
            ),
            hub_cache=HUB_CACHE_PVC,
            hf_token_secret=HF_SECRET,
            idle_timeout_s=300,
        ),
        "qwen35-ray on Kubernetes (KubeRay RayService): Qwen/Qwen3.5-397B-A17B in bf16 on 2 nodes\n"
        "x 8 H100 80 GB, collocated. One replica is an expert-parallel group of 16 ranks, one GPU\n"
        "each, spanning both pods (PACK): per GPU 63.25 GiB of weights (18.25 replicated + 45.00\n"
        "of routed experts, 32 of 512 per layer) and 6.36 GiB of caches (8 sequences per rank,\n"
        "128 per group). One copy of the weights (738 GiB) fills all 16 GPUs, so there is no room\n"
        "for a second replica or for separate prefill and decode pools.\n"
        "A bigger cluster runs disaggregated pools: e.g. 4 nodes as two groups of 2 pods, one\n"
        "advertising prefill_node and one decode_node, and deployments/qwen35-pd.yaml's layout\n"
        "with each pool an EP-16 group pinned by resources {prefill_node: 0.01} /\n"
        "{decode_node: 0.01}. Ranks on different nodes exchange tokens every MoE layer (0.79 ms\n"
        "per decode step over a 400 Gb/s NIC at 8 sequences per rank): give the pods the\n"
        "cluster's RDMA network (an InfiniBand/RoCE device plugin), not the pod network alone.\n"
        "Upgrades (NewCluster) of the cluster part need a second 2 x 8 GPUs while they run.",
    ),
    Sample(
        "raycluster-dev.yaml",
        None,
        ClusterSpec(
            name="qwen35-dev",
            image=CPU_IMAGE,
            head_cpus=2,
            head_memory="4Gi",
            workers=(
                WorkerGroup("cpu", 1, 0, 4, cpus=4, memory="8Gi"),
                WorkerGroup("gpu", 0, 0, 2, cpus=8, memory="64Gi", gpus=1, image=CUDA_IMAGE),
            ),
            hf_token_secret=HF_SECRET,
        ),
        "A Ray cluster for interactive work (KubeRay RayCluster): a CPU head and autoscaled CPU\n"
        "workers (0 to 4), and a GPU group of 0 to 2 pods that the autoscaler starts only when a\n"
        "task or replica asks for a GPU. Use it with `ray job submit`, or `serve deploy` of a\n"
        "deployments/ file through the dashboard:\n"
        "  kubectl port-forward svc/qwen35-dev-head-svc 8265:8265 8000:8000\n"
        "  serve deploy deployments/qwen35.yaml --address http://127.0.0.1:8265",
    ),
)

HUB_CACHE_TEXT = f"""\
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {HUB_CACHE_PVC}
spec:
  # every Ray pod mounts it at HF_HOME, so pods on several nodes share one download
  accessModes:
    - ReadWriteMany
  # Qwen3.5-397B-A17B's bf16 checkpoint is about 750 GiB, Qwen3.5-35B-A3B's about 66 GiB
  resources:
    requests:
      storage: 1Ti
  # a class that offers ReadWriteMany (NFS, CephFS, EFS, Filestore, Azure Files); none given:
  # the cluster's default class
  # storageClassName: nfs
"""
HUB_CACHE_ABOUT = (
    "The Hugging Face hub cache of the GPU samples: a PersistentVolumeClaim every Ray pod mounts\n"
    "at HF_HOME, so a checkpoint is downloaded once and survives pod restarts and upgrades."
)


def header(out: str, about: str, source: str | None) -> str:
    if source is None:
        edit = "Edit qwen35_ray/deploy/k8s_samples.py, then render again"
    else:
        edit = (
            f"Edit deployments/{source} (serveConfigV2 is its text, verbatim) or the\n"
            "cluster in qwen35_ray/deploy/k8s_samples.py, then render again"
        )
    return (
        f"{about}\n\n"
        "Generated by `qwen35-ray k8s render`: do not edit by hand.\n"
        f"{edit}\n"
        "(`qwen35-ray k8s render --check` fails while they differ).\n"
        f"Written for KubeRay {KUBERAY_VERSION} (ray.io/v1) and Ray {ray_version()}.\n"
        "The image, the operator, the Secret and the PVC: k8s/README.md.\n"
        f"Apply: kubectl apply -f k8s/{out}\n"
    )


def render(root: Path) -> dict[str, str]:
    """File name under k8s/ -> the text render writes."""
    files = {}
    for s in SAMPLES:
        text = header(s.out, s.about, s.source)
        if s.source is None:
            files[s.out] = raycluster_yaml(s.spec, text)
        else:
            config = (root / "deployments" / s.source).read_text()
            files[s.out] = rayservice_yaml(config, s.spec, text)
    pvc = header("hub-cache-pvc.yaml", HUB_CACHE_ABOUT, None)
    files["hub-cache-pvc.yaml"] = "".join(f"# {x}".rstrip() + "\n" for x in pvc.splitlines())
    files["hub-cache-pvc.yaml"] += HUB_CACHE_TEXT
    return files


def default_root() -> Path | None:
    # a source checkout: deployments/ beside the package
    root = Path(__file__).resolve().parents[2]
    return root if (root / "deployments").is_dir() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qwen35-ray k8s", description="KubeRay manifests rendered from deployments/"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="write k8s/*.yaml from deployments/ (or --check them)")
    r.add_argument("--check", action="store_true", help="write nothing; exit 1 if any differs")
    r.add_argument("--root", type=Path, help="the repository (default: this checkout)")
    r.add_argument("--out", type=Path, help="output folder (default: ROOT/k8s)")
    args = parser.parse_args(argv)
    root = args.root or default_root()
    if root is None or not (root / "deployments").is_dir():
        print(
            "no deployments/ folder found beside the package; pass --root with the repository",
            file=sys.stderr,
        )
        return 2
    out = args.out or root / "k8s"
    stale = []
    for name, text in render(root).items():
        path = out / name
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if args.check and stale:
        for path in stale:
            print(f"{path} differs from what `qwen35-ray k8s render` writes", file=sys.stderr)
        print("run `qwen35-ray k8s render` and commit the result", file=sys.stderr)
        return 1
    if not stale:
        print(f"{out}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
