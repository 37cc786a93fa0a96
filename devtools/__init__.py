"""Development tools, type-checked like the product: the local control plane and kind tier,
the demo, real and fake servers for tests and benches, the tiny-model builders and the
generators. `tests/` holds tests only; tests and benches import from here."""
