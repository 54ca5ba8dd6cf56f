"""Graded generations during training: graders (OpenAI's shapes), the `evaluation` spec,
batched generation on the in-memory model, best-checkpoint selection and early stopping.

    graders.py     string_check / text_similarity / multi; torch-free
    formula.py     a multi grader's calculate_output: a whitelisted arithmetic parser
    spec.py        EvaluationSpec (+ SelectSpec, EarlyStoppingSpec); torch-free
    selection.py   which evaluation is the best so far, when to stop; torch-free
    generation.py  left-padded batched generate(), adapter on / off
    kv_cache.py    a KV cache written into a reserved buffer (no per-step concatenation)
    callback.py    the Trainer callback: base at step 0, every checkpoint after its save
"""
