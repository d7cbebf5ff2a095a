"""Figures (drawn from stored results) and the HTML report."""


def mean_spread(mean: float, std: float, n: int, fmt: str = ".4g") -> str:
    """"m ± s (n seeds)", or "m (1 seed)" where there is no spread to show."""
    if n <= 1:
        return f"{mean:{fmt}} (1 seed)"
    return f"{mean:{fmt}} ± {std:.2g} ({n} seeds)"
