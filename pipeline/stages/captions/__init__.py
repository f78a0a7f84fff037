"""build-captions: reading, cleaning, exact and near de-duplication, embedding, clustering and selection."""
