"""GBERT (bidirectional, whole-word masked LM) rows; `configs/gbert/<row>.py` = `configs/<row>.py` on that architecture."""
