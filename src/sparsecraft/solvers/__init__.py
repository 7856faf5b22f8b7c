"""Heavy math as pure functions."""
