"""The built-in lab: real hosts (systemd, sshd, dockerd) as containers of a local engine."""
