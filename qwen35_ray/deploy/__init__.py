"""Deploying beyond one machine: KubeRay manifests rendered from deployments/, the local
multi-node cluster's config rewriting, and `qwen35-ray plan` (memory arithmetic -> Serve YAML and
RayService). Sits above serving (it may validate with AppConfig) and never imports Ray itself."""
