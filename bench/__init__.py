"""The benchmark: the in-process ceiling and the real service under wrk (python -m bench; see README.md)."""
