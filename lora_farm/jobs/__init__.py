"""Job specs: what to train (pydantic models, ``jobs.spec``), how YAML becomes one, and its checks."""
