"""cxr-screen models, trainer, evaluation and screening on top of the shard format."""
