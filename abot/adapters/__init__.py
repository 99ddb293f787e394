"""Adapters: small trainable trees on a frozen base model (LoRA, DoRA; QLoRA when the base is quantized).

An adapter kind is registered like an optimizer (`abot list adapters`, entry-point group `abot.adapters`): a
factory `(rank, alpha, dropout) -> AdapterKind(init, apply, merge)` of pure functions over one projection
(`abot.adapters.kind`). `abot.adapters.tree` lifts them to the model's parameter tree: `init_adapters`,
`freeze` (the base in compute precision, quantized for QLoRA), `attach` (the tree `model.apply` sees, built
inside the train step) and `merge` (plain weights, for export and inference).
"""
