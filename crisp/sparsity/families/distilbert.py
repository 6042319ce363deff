"""DistilBERT (``distilbert``: the paper's encoder): attention through the registry; no token types."""

from crisp.sparsity.families import Family, register

register(Family("distilbert", ("distilbert",),
                dropout={"hidden": "dropout", "attention": "attention_dropout", "classifier": "seq_classif_dropout"},
                projections=("q_lin", "k_lin", "v_lin")))
