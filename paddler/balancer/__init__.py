"""The balancer: the management API agents report to, and (next) the reverse proxy."""
