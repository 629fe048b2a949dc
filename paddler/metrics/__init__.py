"""The balancer's metrics: counters shared by its processes, Prometheus's text format,
StatsD, and the autoscaling signal."""
