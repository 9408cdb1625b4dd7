"""What users call: the Python API (llm), the command line (cli) and the HTTP server."""
