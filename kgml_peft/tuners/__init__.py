"""What an adapter is: its config, its components, the training-side site model, the serving
layout and mixed-batch rows. Depends only on :mod:`kgml_peft.model` (and the shared low modules)."""
