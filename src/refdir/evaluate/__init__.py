"""Evaluation of arms: CE, KL, refusal and safety judges, capability benchmarks."""
