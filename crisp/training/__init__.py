"""Training one run: tasks and their data, the encoder, the LightningModule, the train function, CUDA
graphs, loggers and DDP (:func:`crisp.training.train.train`). It imports :mod:`crisp.sparsity` and
:mod:`crisp.core`, never a launcher."""
