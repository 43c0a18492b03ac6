"""One model built at a time in this process. transformers' `from_pretrained` swaps `PreTrainedModel.tie_weights`
and `init_weights` for no-ops while it loads and puts back what it found after (transformers/initialization.py,
`no_tie_weights` and `no_init_weights`): two loads at once in two threads (the app loads its model in a thread
while the bench, a test or another visitor's request loads one) can leave them no-ops for good, and every model
loaded after that with tied embeddings (Gemma 3's) misses its output layer. Every load here holds `LOADING`."""

import threading

LOADING = threading.Lock()
