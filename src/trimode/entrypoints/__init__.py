"""Entry points: the Python API, the CLI, the HTTP server, and Ray Serve replicas."""
