"""Provisioning steps, one module each: read facts, plan what differs, apply only that."""
