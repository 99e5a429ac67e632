"""Checks that change nothing and are not steps of a pipeline: the preflight (before any
change), the port probe between the hosts (part of it), and verify's ping matrix (after)."""
