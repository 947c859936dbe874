"""The network and what is said about it: operators and `Network`, input sets, output specifications, errors."""
