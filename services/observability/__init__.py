"""Observability beyond each service's own ``/metrics``: the Grafana dashboards and their push."""
