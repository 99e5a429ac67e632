"""One pipeline per overlay backend: kv (Consul cluster store) and swarm."""
