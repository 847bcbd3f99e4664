"""Agent daemon: discovery, device profile, stage runtime, tensor streams."""
