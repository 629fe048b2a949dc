"""OpenTelemetry traces of proxied requests, exported over OTLP/HTTP without the SDK."""
