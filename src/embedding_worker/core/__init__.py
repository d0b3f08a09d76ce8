"""The transport-free, engine-free core: one request pipeline and one module per endpoint family
(models, embed, rerank) on it, with the schemas, errors, encoding, image inputs and length batching
they share. It calls the engine only through `engine.base`."""
