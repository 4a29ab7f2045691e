"""``python -m kgml_peft`` runs the CLI (also under ``accelerate launch -m kgml_peft``)."""

from kgml_peft.cli import main

if __name__ == "__main__":
    main()
