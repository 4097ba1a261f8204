"""The built-in algorithm plugins. Each module is one algorithm; they register through the
``bilevel.algorithms`` entry-point group declared in ``pyproject.toml``, as external plugins do,
so the engine (``bilevel``) imports none of them."""
