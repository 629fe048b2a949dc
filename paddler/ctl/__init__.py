"""paddlerctl: look at and steer a running Paddler host."""
