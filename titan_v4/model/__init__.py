"""DeepSeek-V4 model: args, transformer, MoE, MTP, loss."""
