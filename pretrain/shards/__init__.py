"""The shard contract: what a set of webdataset shards looks like on storage.

Both sides use it: the data build (``data_pipeline``) writes shards and their manifest, the
trainer's loader and evaluation read them. It depends on nothing else in the project (no
torch), so the data build can use it without the training stack.

Modules: ``manifest`` (manifest.json: one reader with one set of rules, confinement of its
paths, the writer's record) and ``tario`` (deterministic tar writing, one tar index reader).
"""
