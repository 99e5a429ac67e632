"""Backends: each an ordered list of steps for bootstrap (and join-node) and for teardown."""
