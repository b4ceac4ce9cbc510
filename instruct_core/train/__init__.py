"""Training the context layers: datasets (`data`), retrieval-augmented stage-1 examples (`retrieval`), stage-2
instruction tasks (`instruction_tasks`), the YAML config (`config`), the trainer (`trainer`), its checkpoints
(`checkpointing`) and the two stages wired together (`stages`). Inference never imports this package.
"""
