"""Deep image clustering: pure PyTorch / numpy blocks. Never imports Ray (DESIGN.md §2)."""
