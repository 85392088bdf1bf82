"""layergraft's training library: WebDataset loading, methods, the DeepSpeed engine, evaluation."""
