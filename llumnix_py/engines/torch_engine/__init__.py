"""Built-in paged-KV PyTorch engine: Llama model, checkpoint loader, tokenizers."""
