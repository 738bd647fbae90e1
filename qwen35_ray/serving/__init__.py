"""Ray Serve deployments, the OpenAI-compatible API and routing. The only layer importing Ray."""
