"""Models: the Llama 3 decoder, LoRA, and the Ker-VLJEPA visual bridge."""
