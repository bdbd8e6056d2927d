"""Process runtime: starting/connecting Ray quietly on the loopback address, and signal handling."""
