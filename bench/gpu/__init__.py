"""The GPU suite (``bench/gpu_suite.sh``): one module per part, run by ``suite.py``."""
