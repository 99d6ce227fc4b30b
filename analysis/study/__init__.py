"""The study: config (validated YAML), the pipeline that runs it, its figures, and sweeps over configs."""
