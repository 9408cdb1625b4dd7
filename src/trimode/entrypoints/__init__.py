"""What users call: the Python API (llm), the command line (cli), the HTTP server and Ray Serve replicas (ray)."""
