"""DistilBERT (``distilbert``: the paper's encoder): attention through the registry; no token types."""

from crisp.sparsity.families import Family

FAMILY = Family("distilbert", ("distilbert",))
