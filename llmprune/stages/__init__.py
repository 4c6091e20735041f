"""The pipeline's stage internals, one module each; `pipeline.run` calls them in order."""
