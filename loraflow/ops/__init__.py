"""Running loraflow as a service: events and the watcher, MLflow tracking, the promotion registry, sweeps, the
printed reports, `loraflow up` and the temporary Prefect server of `loraflow run`."""
