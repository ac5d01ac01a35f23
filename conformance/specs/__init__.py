"""One module per family; importing a module registers its specs."""
