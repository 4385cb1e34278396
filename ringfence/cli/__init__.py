"""The `ringfence` command line."""
