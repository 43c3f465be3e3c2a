"""Grafana dashboards generated with grafanalib: one module per dashboard (`training_run`,
`gpu_health`, `efa_network`, `node`), shared variables/links/rendering in `common`, the
committed-file writer in `build`, derived Kubernetes manifests in `manifests`, and the Grafana
HTTP API client in `push`."""
