"""One module per row of the fidelity table; each has ``run(lab) -> Row``."""
