"""Methods on top of the core: refusal scoring, judges of refusal, candidate selection, search."""
