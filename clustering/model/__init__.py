"""What learns (docs/DESIGN.md §2): encoders, augmentations, losses, heads, neighbours in a representation, and the
methods (one file each)."""
