"""The one refusal of the sparsity layer, importable without torch (crisp.core lists it among the user errors)."""


class AttentionNotReached(RuntimeError):
    """crisp cannot make a model's attention sparse: its message names the model class, what crisp's attention
    function did not reach (and why) and the families crisp supports. Raised before anything trains."""
