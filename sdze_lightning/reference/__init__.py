"""Reference solutions computed by our own code (no downloads)."""
