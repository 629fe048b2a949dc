"""Talking to llama-server: every llama.cpp response format is read in this package."""
