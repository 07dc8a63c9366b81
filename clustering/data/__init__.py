"""What images are and where they live: storage, sources, shards (and WebDataset corpora indexed in place), the
training input of a rank, and the Parquet assignments (docs/DESIGN.md §2)."""
