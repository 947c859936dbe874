"""Reading networks, data sets and properties from files."""
