"""The four independent services; each talks to the others only over NATS."""
