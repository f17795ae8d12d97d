"""Mechanistic analysis (paper section 5): residual geometry, adversarial suffixes."""
