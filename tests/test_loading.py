"""Models loaded in two threads at once leave transformers as it was (backends/loading.py): `from_pretrained`
swaps `PreTrainedModel.tie_weights` and `init_weights` for no-ops while it loads, and two loads interleaving
would leave the no-ops behind, after which a model with tied embeddings (Gemma 3) loads without its output layer
(the app loads its model in a thread while other loads go on)."""

import threading

import transformers

import backends


def test_loads_in_two_threads_at_once_leave_weight_tying_working():
    tie, init = transformers.PreTrainedModel.tie_weights, transformers.PreTrainedModel.init_weights
    backends.load("tiny-llava-next", "cpu")  # its checkpoint is saved once, before the threads

    def loads():
        for _ in range(3):
            backends.load("tiny-llava-next", "cpu")

    threads = [threading.Thread(target=loads) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert transformers.PreTrainedModel.tie_weights is tie and transformers.PreTrainedModel.init_weights is init
    gemma = backends.load("tiny-gemma3", "cpu").model  # ties its output layer to its input embeddings
    assert gemma.lm_head.weight is gemma.model.language_model.embed_tokens.weight
