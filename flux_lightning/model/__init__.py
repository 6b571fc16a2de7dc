"""The base model: flavours, ModelConfig, loading the components, the tiny model, quantization,
memory features, regional compile, TREAD routing. No Lightning, no Hydra."""
