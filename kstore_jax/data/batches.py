"""The batch layouts: the one schema that the pipeline yields, the process slicer cuts, the
sharding helpers place and the losses read.

A batch is a dict of arrays (NumPy on the host, jax.Arrays once placed) whose leading axis is
the batch row B in every field: `pipeline.ProcessSlice` keeps a process's block of rows and
`train.sharding.to_global` shards rows over (data, fsdp) without knowing the fields.

LM batch (`pipeline.PackedChunks` -> `pipeline.make_pipeline`; `train.step.make_lm_loss`),
every field [B, L] (L = data.seq_len):
  INPUTS       int32    the model ids the model reads
  TARGETS      int32    the id to predict at each position: the next token (GBERT: the
                        original token at the same position)
  WEIGHTS      float32  1 where the target counts in the loss (bios: every target; QA: the
                        answer value + EOT; GBERT: the masked tokens), else 0
  SEGMENT_IDS  int32    1.. per document in its row, 0 = padding (attention stays inside one)
  POSITIONS    int32    position inside its document (restarts at 0)

Probe batch (`probing.ProbeBatches` -> `pipeline.batch_pipeline`; `model.probes`):
  TOKENS       int32    [B, W]  a bio (P-probe) or [EOT] + full name (Q-probe), padded
  SEGMENT_IDS  int32    [B, W]  1 on real tokens, 0 on padding
  PROBE_AT     int32    [B, J]  the input position whose final hidden state is probed
  LABELS       int32    [B, 6]  each attribute's class (`classes.probe_labels`)
  ROW_WEIGHTS  float32  [B]     1 on the batch's examples, 0 on the rows that pad it to a
                                multiple of the data-parallel devices (copies of its first
                                examples: real inputs, counted nowhere)
"""

import numpy as np

INPUTS = "inputs"
TARGETS = "targets"
WEIGHTS = "weights"
SEGMENT_IDS = "segment_ids"
POSITIONS = "positions"
TOKENS = "tokens"
PROBE_AT = "probe_at"
LABELS = "labels"
ROW_WEIGHTS = "row_weights"

LM_DTYPES = {INPUTS: np.int32, TARGETS: np.int32, WEIGHTS: np.float32,
             SEGMENT_IDS: np.int32, POSITIONS: np.int32}
LM_FIELDS = tuple(LM_DTYPES)
PROBE_FIELDS = (TOKENS, SEGMENT_IDS, PROBE_AT, LABELS, ROW_WEIGHTS)
