"""Expert parallelism over Ray: one engine spanning N rank actors (DESIGN.md, "Parallelism").

The only package besides serving/ that imports ray. Entry point: build.build_engine."""
