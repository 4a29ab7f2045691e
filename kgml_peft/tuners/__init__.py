"""What an adapter is: one module per component (:mod:`~kgml_peft.tuners.lora`,
:mod:`~kgml_peft.tuners.blocks`, :mod:`~kgml_peft.tuners.head`), the protocol they implement
(:mod:`~kgml_peft.tuners.base`), the config, the training-side site model, the serving layout and
mixed-batch rows. Depends only on :mod:`kgml_peft.model` (and the shared low modules); importing
this package registers the built-in components.
"""

from kgml_peft.tuners.base import Component, Part, register, registered, unregister
from kgml_peft.tuners.blocks import Blocks
from kgml_peft.tuners.head import Head
from kgml_peft.tuners.lora import Lora

for _component in (Lora(), Blocks(), Head()):
    register(_component)

__all__ = ["Blocks", "Component", "Head", "Lora", "Part", "register", "registered", "unregister"]
