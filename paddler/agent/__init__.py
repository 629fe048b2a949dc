"""The agent: watches one llama-server and reports its slots to the balancers."""
