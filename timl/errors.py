"""The errors that end a run for a reason the user can act on: the message says what happened and what to do, so a
recipe prints it alone, without a traceback (`timl.train.pretrain.recipe_process`)."""


class RunError(RuntimeError):
    """A run cannot go on: a bad checkpoint, a failed save, a non-finite loss, an output folder in use."""
