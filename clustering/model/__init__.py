"""Model code of the representation path (DESIGN.md §2): what learns a representation and clusters in it."""
