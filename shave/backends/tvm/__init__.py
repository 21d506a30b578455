"""IR -> TVM Relax -> compiled library."""
