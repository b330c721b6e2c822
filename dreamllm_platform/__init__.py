"""The Ray layer of DreamLLM: config, storage, data pipelines, training, tracking, serving."""
