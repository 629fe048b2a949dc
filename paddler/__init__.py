"""Paddler: a slot-aware load balancer for llama.cpp fleets."""

__version__ = "0.1.0"
