"""paddlerd: the per-host supervisor of the agent, balancer and llama-server processes."""
