"""What every stage shares: the Stage class, the runner and its executors, storage, schemas, shards, options."""
