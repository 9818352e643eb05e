"""Built-in slide model families; importing this module registers them."""
