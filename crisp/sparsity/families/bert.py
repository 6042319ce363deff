"""BERT (``bert``: bert-base-uncased, all-MiniLM-L6-v2): attention through the registry; pairs by token types."""

from crisp.sparsity.families import Family, register

register(Family("bert", ("bert",), token_types=True,
                dropout={"hidden": "hidden_dropout_prob", "attention": "attention_probs_dropout_prob",
                         "classifier": "classifier_dropout"},
                projections=("query", "key", "value")))
