"""Reference selection functions copied from the methods' authors (each file names its source and licence)."""
