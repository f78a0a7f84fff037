"""Reading inputs: files, folders and globs into work units; images, tar shards and caption files into records."""
