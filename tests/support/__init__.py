"""Test support: real nats-server, real service processes, small waiting helpers."""
