"""`slm build`: plan, train, compress, verify and ship a model within a budget and targets (see `pipeline`)."""
