"""The roles that paddlerd runs as child processes."""
