"""Ringfence: session controls for plain OpenSSH fleets."""

__version__ = "0.1.0"
