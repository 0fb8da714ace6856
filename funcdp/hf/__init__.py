"""Hugging Face `transformers` and `peft` models in a DP train step (optional: `funcdp[hf]`).

```python
task = fdp.hf.causal_lm(peft_model)          # or fdp.hf.sequence_classification(model)
step = fdp.make_train_step(task.loss_fn, privatizer, optimizer)
state = fdp.TrainState.create(task.params, buffers=task.buffers, ...)
state, metrics = step(state, fdp.Batch((input_ids, attention_mask, labels), mask))
fdp.hf.save_adapter(task.model, state, "adapter/")
```

`import funcdp` does not import this package (nor transformers); `import funcdp.hf` does.
"""

from funcdp.hf.attention import math_attention, vmap_attention
from funcdp.hf.epochs import epsilon_per_epoch
from funcdp.hf.export import save_adapter
from funcdp.hf.losses import IGNORE_INDEX, causal_lm_labels, causal_lm_loss, classification_loss
from funcdp.hf.task import HFTask, causal_lm, sequence_classification

__all__ = [
    "IGNORE_INDEX",
    "HFTask",
    "causal_lm",
    "causal_lm_labels",
    "causal_lm_loss",
    "classification_loss",
    "epsilon_per_epoch",
    "math_attention",
    "save_adapter",
    "sequence_classification",
    "vmap_attention",
]
