"""Llama block (RMSNorm, SwiGLU, full rotary) rows; `configs/llama/<row>.py` = `configs/<row>.py` on that architecture."""
