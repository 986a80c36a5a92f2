"""The Ray Serve application: the HTTP ingress, the Coordinator deployment, the API protocol, metrics."""
