"""Cluster smoke tests: `pytest --pyargs overlaylab.smoke --inventory FILE` checks a live
cluster as an operator would. Registered as a pytest plugin (entry point pytest11)."""
