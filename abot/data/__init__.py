"""Text in, token batches out: the built-in offline corpus, registered data sources, and the batch pipeline.

`corpus` extracts the standard library's docstrings (text that exists on every machine with Python),
`sources` turns a `DataConfig` into a per-epoch stream of documents, and `pipeline` tokenizes, packs and
shuffles those documents into fixed-shape, resumable batches.
"""
