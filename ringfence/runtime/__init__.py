"""What every service process shares: connecting, discovery, start-up, shutdown."""
