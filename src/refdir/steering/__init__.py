"""Steering vectors: the typed vector, CAA, jailbreak and bias vectors."""
