"""Loading the model and its tokenizer: local or hub weights, the embedded default, dtype and attention backend."""
